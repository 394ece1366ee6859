"""Builds the plugin manager and the registries it fills; calls lifecycle hooks without letting them hurt a run."""

from __future__ import annotations

import collections
import importlib
import importlib.metadata
import logging
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .registry import FAMILIES, Registry

log = logging.getLogger("asyncbatch")

ENTRY_POINT_GROUP = "asyncbatch"
# Built-ins are plugins too; named by module path so that core never imports plugins/ directly.
DEFAULT_PLUGINS: tuple[str, ...] = ("asyncbatch.plugins.builtin",)

_REGISTER_HOOKS: dict[str, str] = {
    "scheduler": "asyncbatch_register_schedulers",
    "buffer_policy": "asyncbatch_register_buffer_policies",
    "stream_topology": "asyncbatch_register_stream_topologies",
    "graph_policy": "asyncbatch_register_graph_policies",
    "attention_backend": "asyncbatch_register_attention_backends",
    "prefix_cache": "asyncbatch_register_prefix_caches",
    "runtime": "asyncbatch_register_runtimes",
    "model_preset": "asyncbatch_register_model_presets",
    "workload": "asyncbatch_register_workloads",
}
LIFECYCLE_HOOKS: tuple[str, ...] = (
    "asyncbatch_run_started",
    "asyncbatch_step_finished",
    "asyncbatch_request_finished",
    "asyncbatch_run_finished",
)


MAX_KEPT_HOOK_ERRORS = 1000

class PluginHost:
    """A plugin manager plus the registries its plugins filled.

    Build one with `PluginHost.create()`; `extra_plugins` are registered after the built-ins and entry points (a
    test can pass objects or modules). Registries are filled once, at creation.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.registries: dict[str, Registry] = {f: Registry(f) for f in FAMILIES}
        # The newest failures (bounded: a hook failing on every step must not grow memory); `hook_error_count`
        # counts them all.
        self.hook_errors: collections.deque[PluginError] = collections.deque(maxlen=MAX_KEPT_HOOK_ERRORS)
        self.hook_error_count = 0
        for family in FAMILIES:
            self._fill(family)

    @classmethod
    def create(
        cls,
        *,
        extra_plugins: Iterable[object] = (),
        load_entry_points: bool = True,
        default_plugins: Iterable[str] = DEFAULT_PLUGINS,
    ) -> PluginHost:
        pm = pluggy.PluginManager("asyncbatch")
        pm.add_hookspecs(hookspecs)
        for modname in default_plugins:
            pm.register(importlib.import_module(modname), name=modname)
        if load_entry_points:
            _load_entry_points(pm)
        for i, plugin in enumerate(extra_plugins):
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            pm.register(plugin, name=name if pm.get_plugin(name) is None else f"{name}#{i}")
        _check_hook_names(pm)
        return cls(pm)

    def _fill(self, family: str) -> None:
        hook = getattr(self.pm.hook, _REGISTER_HOOKS[family])
        registry = self.registries[family]
        # get_hookimpls() lists in registration order: built-ins first, so a clash blames the newcomer.
        for impl in hook.get_hookimpls():
            plugin = impl.plugin_name

            def register(name: str, factory: Any, *, config: type | None = None, description: str = "",
                         _plugin: str = plugin) -> None:
                registry.register(name, factory, plugin=_plugin, config=config, description=description)

            try:
                impl.function(register=register)
            except Exception as exc:  # a broken plugin is named, never silently skipped
                raise PluginError(plugin, _REGISTER_HOOKS[family], exc) from exc

    def registry(self, family: str) -> Registry:
        return self.registries[family]

    def notify(self, hook_name: str, **kwargs: Any) -> list[PluginError]:
        """Call a lifecycle hook on every plugin; log and return the failures instead of raising."""
        if hook_name not in LIFECYCLE_HOOKS:
            raise ValueError(f"{hook_name} is not a lifecycle hook; lifecycle hooks: {', '.join(LIFECYCLE_HOOKS)}")
        errors: list[PluginError] = []
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            try:  # only the arguments it declares: pluggy lets an implementation take a subset of the spec's
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception as exc:
                err = PluginError(impl.plugin_name, hook_name, exc)
                log.error("%s", err)
                errors.append(err)
        self.hook_errors.extend(errors)
        self.hook_error_count += len(errors)
        return errors

    def has_lifecycle_impls(self, hook_name: str) -> bool:
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())

    def plugin_names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin())


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    declared: dict[str, str] = {}  # entry-point name -> the distribution that declares it
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if getattr(ep, "dist", None) is not None else "an unknown distribution"
        if ep.name in declared:  # the second would be skipped in silence, and its components missing
            raise PluginError(ep.name, f"entry point {ep.value}", ValueError(
                f"both {declared[ep.name]} and {dist} declare the entry point {ep.name!r}; uninstall one or rename "
                "its entry point"), doing="to load from")
        declared[ep.name] = dist
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin: ModuleType | object = ep.load()
        except Exception as exc:
            raise PluginError(ep.name, f"entry point {ep.value}", exc, doing="to load from") from exc
        try:  # a hook implementation whose arguments are not its spec's, or a module under two names
            pm.register(plugin, name=ep.name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(ep.name, f"entry point {ep.value}", exc, doing="to register from") from exc


def _check_hook_names(pm: pluggy.PluginManager) -> None:
    """A hook implementation whose name is no asyncbatch hook (a typo: `asyncbatch_register_scheduler`) would never
    be called, and its components would be missing without a word."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        hooks = sorted(h for h in dir(pm.hook) if h.startswith("asyncbatch_") and getattr(pm.hook, h).has_spec())
        raise PluginError(name, "check", ValueError(f"{exc} (asyncbatch hooks: {', '.join(hooks)})"),
                          doing="the hook") from exc


_default_host: PluginHost | None = None


def get_plugin_host() -> PluginHost:
    """The process-wide host with built-ins and entry-point plugins, created on first use."""
    global _default_host
    if _default_host is None:
        _default_host = PluginHost.create()
    return _default_host


def reset_plugin_host() -> None:
    """Forget the process-wide host so the next call rescans entry points (tests, notebooks)."""
    global _default_host
    _default_host = None
