"""MkDocs hook: generates the YAML reference of docs/configuration.md at build time.

The placeholder line ``<!-- yaml-reference -->`` in a page is replaced by tables built from the code itself:
the top-level experiment sections (attrs classes in `asyncbatch.core.config` and `asyncbatch.core.types`) and
every component of every registry family, with its config fields, types and defaults. Components come from
``PluginHost.create(load_entry_points=False)``: the built-ins only, whatever plugins the build machine has
installed. Nothing here builds a model or imports torch.

The hook also stands in a short page for ``benchmarks.md`` while that file does not exist yet, so that the nav
entry "Benchmarks (GPU)" never breaks a ``--strict`` build.
"""

from __future__ import annotations

import logging
import types
import typing
from typing import Any

import attrs
import yaml

log = logging.getLogger("mkdocs.hooks.yaml_reference")

PLACEHOLDER = "<!-- yaml-reference -->"

# Where each registry family is chosen in an experiment file.
FAMILY_KEYS = {
    "scheduler": "engine.scheduler",
    "buffer_policy": "engine.buffers",
    "stream_topology": "engine.streams",
    "graph_policy": "engine.graphs",
    "attention_backend": "engine.attention",
    "prefix_cache": "engine.prefix_cache",
    "runtime": "engine.runtime",
    "model_preset": "engine.model.preset",
    "workload": "workload",
}

BENCHMARKS_STUB = """# Benchmarks (GPU)

The GPU results page is being written. The raw measurements are in the repository under `docs/data/`
(JSON, H200, 2026-11-26) and the Chrome traces under `docs/traces/`.
"""


# ---------------------------------------------------------------- formatting


def _yaml(value: Any) -> str:
    """A default value as YAML flow syntax, the way it would be written in a config file."""
    from asyncbatch.core.config import unstructure

    text = yaml.safe_dump(unstructure(value), default_flow_style=True, sort_keys=False, width=10**6)
    return text.strip().removesuffix("...").strip()


def _type(tp: Any) -> str:
    """A Python type as a YAML user reads it (no `|`: it would split a table cell)."""
    from asyncbatch.core.config import ComponentSpec

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return "any"
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or `null`" if type(None) in args else text
    if origin in (tuple, list):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if tp is ComponentSpec:
        return "component"
    if isinstance(tp, type):
        if attrs.has(tp):
            return "mapping"
        return {"bool": "bool", "int": "int", "float": "float", "str": "string"}.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _allowed(field: attrs.Attribute) -> str:
    options = getattr(field.validator, "options", None)  # attrs.validators.in_
    return " (one of " + ", ".join(f"`{o}`" for o in options) + ")" if options else ""


def _default(field: attrs.Attribute, owner_default: Any) -> Any:
    if owner_default is not attrs.NOTHING:
        return getattr(owner_default, field.name)
    default = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    return default


def _doc(obj: Any) -> str:
    """A docstring as one paragraph per blank-line block, re-wrapped."""
    text = (getattr(obj, "__doc__", None) or "").strip()
    paragraphs = [" ".join(line.strip() for line in p.splitlines()) for p in text.split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def _row(f: attrs.Attribute, tp: Any, key: str, default: Any) -> tuple[str, str, str]:
    from asyncbatch.core.config import ComponentSpec

    if isinstance(default, ComponentSpec):
        shown = f"`{default.name}`"
    elif default is attrs.NOTHING:
        shown = "required"
    else:
        shown = f"`{_yaml(default)}`"
    return f"`{key}`", _type(tp) + _allowed(f), shown


def _is_nested(tp: Any) -> bool:
    from asyncbatch.core.config import ComponentSpec

    return isinstance(tp, type) and attrs.has(tp) and tp is not ComponentSpec


def field_rows(cls: type, prefix: str = "", owner_default: Any = attrs.NOTHING,
               skip: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(key, type, default) for every init field of attrs class `cls`; nested attrs classes are expanded into
    dotted keys, with defaults taken from the enclosing default (e.g. `prompt_len.dist` is `uniform`)."""
    hints = typing.get_type_hints(cls)
    rows: list[tuple[str, str, str]] = []
    for f in attrs.fields(cls):
        if not f.init or f.name in skip:
            continue
        tp, default, key = hints[f.name], _default(f, owner_default), f"{prefix}{f.name}"
        if _is_nested(tp):
            rows.append((f"`{key}`", f"mapping ({tp.__name__}), keys below", ""))
            rows.extend(field_rows(tp, f"{key}.", default))
        else:
            rows.append(_row(f, tp, key, default))
    return rows


def table(rows: list[tuple[str, str, str]]) -> str:
    if not rows:
        return "No parameters.\n"
    out = ["| key | type | default |", "|---|---|---|"]
    out += [f"| {k} | {t} | {d} |" for k, t, d in rows]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- sections


def top_level() -> str:
    from asyncbatch.core import config as c
    from asyncbatch.core.types import SamplingParams

    families = dict(c._ENGINE_FAMILIES)
    hints = typing.get_type_hints(c.EngineConfig)
    parts = ["### Experiment file (top level) {#experiment}\n",
             _doc(c.ExperimentConfig) + "\n",
             table(field_rows(c.ExperimentConfig, skip=("engine", "sampling", "output"))),
             "`engine`, `sampling` and `output` are described below. `workload` is a component: "
             "see [workload](#workload).\n",
             "### `engine` {#engine}\n",
             _doc(c.EngineConfig) + "\n",
             "The component keys take a name (`buffers: double`) or a mapping with `name` and that "
             "component's parameters (`buffers: {name: n_slot, num_slots: 3}`).\n",
             "| key | type | default |", "|---|---|---|"]
    for f in attrs.fields(c.EngineConfig):
        tp = hints[f.name]
        if f.name in families:
            fam = families[f.name]
            parts.append(f"| `{f.name}` | component: [{fam}](#{fam}) | `{f.default.name}` |")
        elif _is_nested(tp):
            parts.append(f"| `{f.name}` | mapping: [engine.{f.name}](#engine-{f.name}) | |")
        else:
            parts.append("| " + " | ".join(_row(f, tp, f.name, _default(f, attrs.NOTHING))) + " |")
    parts.append("")
    for name, cls in (("engine.model", c.ModelConfig), ("engine.cache", c.CacheConfig),
                      ("engine.batch", c.BatchConfig), ("engine.startup", c.StartupConfig),
                      ("engine.parallel", c.ParallelConfig), ("engine.serve", c.ServeConfig),
                      ("sampling", SamplingParams), ("output", c.OutputConfig)):
        anchor = name.replace(".", "-")
        parts += [f"### `{name}` {{#{anchor}}}\n", _doc(cls) + "\n", table(field_rows(cls))]
    return "\n".join(parts)


def _nested_notes(cls: type) -> list[str]:
    """One line per nested attrs class of `cls`: which keys use it, and its docstring."""
    hints = typing.get_type_hints(cls)
    users: dict[type, list[str]] = {}
    for f in attrs.fields(cls):
        if f.init and _is_nested(hints[f.name]):
            users.setdefault(hints[f.name], []).append(f"`{f.name}`")
    return [f"{', '.join(keys)} ({tp.__name__}): {_doc(tp)}\n" for tp, keys in users.items() if _doc(tp)]


def example(family: str, name: str, cls: type | None, host: Any) -> str:
    """A YAML snippet choosing this component with its default parameters, checked by the config loader."""
    from asyncbatch.core.config import ComponentSpec, unstructure

    params = unstructure(cls()) if cls is not None else {}
    value: Any = {"name": name, **params} if params else name
    ComponentSpec.resolve(family, value, FAMILY_KEYS[family], host)  # fails the build if the snippet is wrong
    *parents, last = FAMILY_KEYS[family].split(".")
    lines = [f"{'  ' * i}{p}:" for i, p in enumerate(parents)]
    body = (f"{last}: {value}\n" if isinstance(value, str)
            else yaml.safe_dump({last: value}, sort_keys=False, default_flow_style=None, width=100))
    lines += ["  " * len(parents) + line for line in body.splitlines()]
    return "```yaml\n" + "\n".join(lines) + "\n```\n"


def components() -> str:
    from asyncbatch.core.plugin_host import PluginHost
    from asyncbatch.core.registry import FAMILIES

    host = PluginHost.create(load_entry_points=False)
    parts = []
    for family in FAMILIES:
        registry = host.registry(family)
        key = FAMILY_KEYS[family]
        parts.append(f"### {family} {{#{family}}}\n")
        parts.append(f"Chosen with `{key}`. Registered: {', '.join(f'`{n}`' for n in registry.names())}.\n")
        if family == "model_preset":
            parts.append("Presets build a transformers config with random weights (no download). They take no "
                         "parameters; `engine.model.overrides` changes fields of the built config.\n")
            parts.append("| `engine.model.preset` | model |\n|---|---|")
            parts += [f"| `{c.name}` | {(_doc(c.factory) or c.description).replace('|', '&#124;')} |"
                      for c in registry]
            parts.append("")
            continue
        for comp in registry:
            parts.append(f"#### `{comp.name}` {{#{family}-{comp.name}}}\n")
            desc = _doc(comp.factory) or comp.description
            if comp.description and not desc.startswith(comp.description[:20]):
                desc = comp.description  # an explicit `register(..., description=...)` wins
            if desc:
                parts.append(desc[0].upper() + desc[1:] + "\n")
            cls = comp.config_cls
            rows = field_rows(cls) if cls is not None else []
            if rows:
                cdoc = _doc(cls)
                if cdoc:
                    parts.append(cdoc + "\n")
                parts.append(table(rows))
                parts += _nested_notes(cls)
            else:
                parts.append("No parameters.\n")
            parts.append(example(family, comp.name, cls, host))
            if cls is not None:
                parts.append(f"Config class: `{cls.__module__}.{cls.__qualname__}`.\n")
    return "\n".join(parts)


def reference() -> str:
    return "\n".join([
        "<!-- generated at build time by docs/hooks/yaml_reference.py; do not edit -->\n",
        "## YAML reference\n",
        "Generated from the code when the site is built: every key, its type and its default. Components are "
        "the built-ins (plugins installed on your machine add more: `asyncbatch list`).\n",
        top_level(),
        "## Components\n",
        components(),
    ])


# ---------------------------------------------------------------- mkdocs events


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    if files.get_file_from_path("benchmarks.md") is None:
        log.info("docs/benchmarks.md does not exist yet: using a stand-in page")
        files.append(File.generated(config, "benchmarks.md", content=BENCHMARKS_STUB))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if PLACEHOLDER not in markdown:
        return markdown
    return markdown.replace(PLACEHOLDER, reference())
