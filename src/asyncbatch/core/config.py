"""Configuration: `EngineConfig` and `ExperimentConfig`, frozen attrs values structured and validated at load time.

YAML is read in exactly one place (`config_file.load_yaml`); `--set` overrides apply to the plain mapping
(`dotted`), then it is structured here. Every component family is a `ComponentSpec` (`component_spec`): a
registered name plus that component's own config. A sweep expands into validated cells (`sweep_cells`). Unknown
keys, unknown names and wrong types fail here, naming the dotted key and listing the valid choices, before any
model is built. Every config name is importable from this module.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import attrs

from .component_spec import ComponentSpec
from .config_file import load_yaml
from .dotted import apply_override, parse_value, set_path, sweep_axes
from .engine_parts import (
    BatchConfig,
    CacheConfig,
    ModelConfig,
    ParallelConfig,
    ServeConfig,
    StartupConfig,
    threads_validator,
)
from .errors import ConfigError
from .replicates import replica
from .structure import structure, unstructure
from .sweep_cells import cell_key, expand_sweep
from .types import SamplingParams, show

# Names defined in the modules above, imported from here too.
__all__ = ["BatchConfig", "CacheConfig", "ComponentSpec", "EngineConfig", "ExperimentConfig", "ModelConfig",
           "OutputConfig", "ServeConfig", "StartupConfig", "apply_override", "cell_key", "load_yaml", "parse_value",
           "unstructure"]
_set_path = set_path  # the name tests and older plugins import

# ---------------------------------------------------------------- engine

_ENGINE_FAMILIES = {
    "runtime": "runtime",
    "scheduler": "scheduler",
    "buffers": "buffer_policy",
    "streams": "stream_topology",
    "graphs": "graph_policy",
    "attention": "attention_backend",
    "prefix_cache": "prefix_cache",
}


@attrs.frozen
class EngineConfig:
    """Everything needed to build an `Engine`: the model, the four strategy families, runtime and attention.

    `compile`: `layers` compiles the decoder layers with torch.compile (fuses the small kernels between matrix
    products); `auto` compiles where steps are captured in CUDA graphs (eager launches gain nothing from it),
    and always under `batch_invariant` (so every graph policy runs the same program); `none` never.

    `fuse_projections`: run sibling projections that read the same input (q/k/v, gate/up) as one matrix product
    over concatenated weights; `auto` does it where steps are captured on a GPU (the gain is fewer, fuller GEMMs
    there; elsewhere the model keeps its own layers, so CPU runs match transformers bit for bit).

    `decode_gemm`: the matrix products of the decoder layers in steps of few rows (not with `batch_invariant`):
    `triton` runs a Triton kernel with the batch on the MMA's rows (at most 64 rows), `tma` one that streams
    weight tiles with Hopper's tensor memory accelerator (at most 32 rows, bf16/fp16, compute capability >= 9.0);
    cuBLAS beyond. `torch` always `torch.nn.functional.linear`. `auto` is the kernel measured fastest in the
    engine on this card (`triton` on an H100 SXM, `tma` on an H200) where steps are captured in CUDA graphs, else
    `torch`.

    `pdl`: `always` launches the decode GEMMs and Triton attention kernels of steps of <= 64 tokens as programmatic
    dependent launches (compute capability >= 9.0); `auto`: as measured with the card's kernel (on with `triton`,
    off with `tma`), else `never`. Neither key changes a result beyond the chosen kernel's rounding.

    `fold_norms`: fold each decoder layer's RMSNorms and residual adds into the epilogues of the decode GEMMs
    around them (the norm's division after the product that follows it), so that steps of few rows run no norm
    or add kernels; needs the `tma` decode GEMM, fused projections and a Llama, Mistral or Qwen2/3 layer, and is
    off under tensor parallelism. `auto` folds wherever those hold; `always` fails where they do not. Rounds
    like any kernel change within bf16.

    `fuse_rotary`: the attention backend rotates q and k where it loads them, so no step runs rotary kernels; needs
    a backend that applies it (`triton`) and a Llama, Mistral or Qwen2/3 layer, not under tensor parallelism.
    `auto` fuses wherever those hold, `always` fails where they do not. Rounds as the compiled rotary does.

    `batch_invariant`: compute every row of a step with kernels whose reduction order does not depend on the rest
    of the batch (GEMMs with one tile shape and no split-K, RMSNorm per row, one attention path for decode and
    mixed steps), so that a request's tokens are bitwise identical in bfloat16 whatever shares its batch and
    whatever the buffer, stream and graph policies. Needs a CUDA device, triton and the `triton` attention
    backend; costs some speed (see the benchmarks).

    `parallel`: scale-out over processes (`data`: engine replicas, one per process and device; see
    `asyncbatch.parallel`).

    `threads`: torch's intra-op CPU threads for this process (`torch.set_num_threads`), set when the engine is
    built; None keeps torch's default (one per core, which oversubscribes a busy machine).

    `serve`: the live engine of `asyncbatch serve` (queue bound, shutdown, served model name); runs ignore it.

    `prefix_cache`: how full KV blocks are shared between requests with a common prefix (`none`, `blocks`,
    `radix`); a request that hits the cache prefills only its uncached suffix. The cache lives for one run (one
    `Engine.run` call, or the whole life of a server).
    """

    model: ModelConfig = ModelConfig()
    runtime: ComponentSpec = ComponentSpec("auto")
    scheduler: ComponentSpec = ComponentSpec("fifo")
    buffers: ComponentSpec = ComponentSpec("double")
    streams: ComponentSpec = ComponentSpec("three")
    graphs: ComponentSpec = ComponentSpec("mixed")
    attention: ComponentSpec = ComponentSpec("auto")
    prefix_cache: ComponentSpec = ComponentSpec("none")
    cache: CacheConfig = CacheConfig()
    batch: BatchConfig = BatchConfig()
    compile: Literal["auto", "none", "layers"] = "auto"
    startup: StartupConfig = StartupConfig()
    seed: int = 0
    threads: int | None = attrs.field(default=None, validator=threads_validator)
    fuse_projections: Literal["auto", "always", "never"] = "auto"
    decode_gemm: Literal["auto", "triton", "tma", "torch"] = "auto"
    pdl: Literal["auto", "always", "never"] = "auto"
    fold_norms: Literal["auto", "always", "never"] = "auto"
    fuse_rotary: Literal["auto", "always", "never"] = "auto"
    batch_invariant: bool = False
    parallel: ParallelConfig = ParallelConfig()
    serve: ServeConfig = ServeConfig()

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, host: Any = None, key: str = "") -> EngineConfig:
        """Structure and validate an engine mapping (the `engine:` section of an experiment file)."""
        if not isinstance(data, dict):
            raise ConfigError(key or "engine", f"expected a mapping, got {type(data).__name__}")
        data = dict(data)
        known = [f.name for f in attrs.fields(cls)]
        for k in data:
            if k not in known:
                raise ConfigError(f"{key}.{k}" if key else k, "unknown key", known)
        specs: dict[str, ComponentSpec] = {}
        defaults = {f.name: f.default for f in attrs.fields(cls)}
        for field, family in _ENGINE_FAMILIES.items():
            sub = f"{key}.{field}" if key else field
            value = data.pop(field) if field in data else defaults[field].name
            specs[field] = ComponentSpec.resolve(family, value, sub, host)
        base = structure(_EngineScalars, data, key)
        if base.model.preset is not None:  # an unknown preset fails here, not once the run has started
            if host is None:
                from .plugin_host import get_plugin_host  # noqa: PLC0415

                host = get_plugin_host()
            host.registry("model_preset").get(base.model.preset, f"{key}.model.preset" if key else "model.preset")
        return cls(**attrs.asdict(base, recurse=False), **specs)

    @classmethod
    def from_yaml(cls, path: str | Path, *, host: Any = None) -> EngineConfig:
        """Read an engine file, or the `engine:` section of an experiment file (validating the whole file)."""
        data = load_yaml(path)
        if "engine" in data:
            return ExperimentConfig.from_dict(data, host=host).engine
        return cls.from_dict(data, host=host)

    def to_dict(self) -> dict[str, Any]:
        return unstructure(self)

    def with_defaults_resolved(self, host: Any = None) -> EngineConfig:
        """Fill default component configs (defaults are stored as bare names) from the registry."""
        specs = {}
        for field, family in _ENGINE_FAMILIES.items():
            spec: ComponentSpec = getattr(self, field)
            if spec.config is None:
                specs[field] = ComponentSpec.resolve(family, spec.name, field, host)
        return attrs.evolve(self, **specs)


@attrs.frozen
class _EngineScalars:
    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    batch: BatchConfig = BatchConfig()
    compile: Literal["auto", "none", "layers"] = "auto"
    startup: StartupConfig = StartupConfig()
    seed: int = 0
    threads: int | None = attrs.field(default=None, validator=threads_validator)
    fuse_projections: Literal["auto", "always", "never"] = "auto"
    decode_gemm: Literal["auto", "triton", "tma", "torch"] = "auto"
    pdl: Literal["auto", "always", "never"] = "auto"
    fold_norms: Literal["auto", "always", "never"] = "auto"
    fuse_rotary: Literal["auto", "always", "never"] = "auto"
    batch_invariant: bool = False
    parallel: ParallelConfig = ParallelConfig()
    serve: ServeConfig = ServeConfig()


# ---------------------------------------------------------------- experiments


@attrs.frozen
class OutputConfig:
    """Where a run writes results. `trace: true` also writes a Chrome/Perfetto trace of CPU phases and streams."""

    dir: str = "results"
    trace: bool = False
    plots: bool = True
    progress: bool = True


def _at_least_one(_: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ConfigError(attribute.name, f"expected an int >= 1 (runs of every sweep cell), got {show(value)}")


@attrs.frozen
class ExperimentConfig:
    """A YAML experiment: engine, workload, default sampling, and an optional sweep matrix over any keys.

    `sweep` maps dotted keys to lists of values; every combination is one cell. Its `zip` entry, a mapping of
    dotted keys to lists of equal length, varies those keys together (one cell per position, not their product).
    Two cells that would be the same run (a value listed twice, or two read alike: `1` and `1.0`) are refused.
    `repeat: N` runs every cell N times (`replicates`: repetition i adds i to the seeds; swept seeds that would
    meet are refused).
    """

    name: str = "experiment"
    engine: EngineConfig = EngineConfig()
    workload: ComponentSpec = ComponentSpec("synthetic")
    sampling: SamplingParams = SamplingParams()
    sweep: dict = attrs.Factory(dict)
    output: OutputConfig = OutputConfig()
    seed: int = 0
    repeat: int = attrs.field(default=1, validator=_at_least_one)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, host: Any = None) -> ExperimentConfig:
        if not isinstance(data, dict):
            raise ConfigError("", f"an experiment is a mapping, got {type(data).__name__}")
        data = copy.deepcopy(data)
        known = {f.name for f in attrs.fields(cls)}
        if "simulate" in data and "simulate" not in known:
            raise ConfigError("simulate", "this is a simulation study file: run it with `asyncbatch simulate FILE`")
        for k in data:
            if k not in known:
                raise ConfigError(k, "unknown key", list(known))
        engine = EngineConfig.from_dict(data.pop("engine", {}), host=host, key="engine")
        workload = ComponentSpec.resolve("workload", data.pop("workload", "synthetic"), "workload", host)
        sampling = structure(SamplingParams, data.pop("sampling", {}), "sampling")
        try:
            sampling.validate()
        except Exception as exc:
            field = str(exc).split(" ", 1)[0]  # RequestError messages start with the field's name
            known_field = field in {f.name for f in attrs.fields(SamplingParams)}
            raise ConfigError(f"sampling.{field}" if known_field else "sampling", str(exc)) from exc
        rest = structure(_ExperimentScalars, data, "")
        exp = cls(engine=engine, workload=workload, sampling=sampling, **attrs.asdict(rest, recurse=False))
        exp.sweep_cells(host=host)  # validate every sweep cell now, before any model is built
        return exp

    @classmethod
    def from_yaml(cls, path: str | Path, *, overrides: list[str] = (), host: Any = None) -> ExperimentConfig:
        data = load_yaml(path)
        defaults = cls().to_dict() if overrides else None  # a section the file leaves out starts from its default
        for item in overrides:
            apply_override(data, item, defaults)
        return cls.from_dict(data, host=host)

    def to_dict(self) -> dict[str, Any]:
        return unstructure(self)

    def sweep_keys(self) -> list[str]:
        """The swept dotted keys in table order: the `sweep` mapping's order, a `zip` group's keys in its place."""
        return [k for keys, _ in sweep_axes(self.sweep) for k in keys]

    def sweep_cells(self, host: Any = None) -> list[tuple[dict[str, Any], ExperimentConfig]]:
        """Expand the sweep (`sweep_cells.expand_sweep`): one (assignment, config) per cell, each validated; no
        sweep -> one cell, this experiment."""
        if not sweep_axes(self.sweep):
            return [({}, self)]
        base = self.to_dict()
        base.pop("sweep")
        return expand_sweep(base, self.sweep, lambda data: ExperimentConfig.from_dict(data, host=host), host,
                            self.repeat)

    def replica(self, index: int) -> ExperimentConfig:
        """Repetition `index` of this experiment as a single run (`repeat: 1`); repetition 0 is the experiment.
        Repetition i adds i to the workload `seed` (prompts, lengths, arrivals), to `workload.seed` where the
        workload sets its own, and to `engine.seed` (per-request sampling seeds); see `replicates.replica`."""
        return replica(self, index)


@attrs.frozen
class _ExperimentScalars:
    name: str = "experiment"
    sweep: dict = attrs.Factory(dict)
    output: OutputConfig = OutputConfig()
    seed: int = 0
    repeat: int = attrs.field(default=1, validator=_at_least_one)

