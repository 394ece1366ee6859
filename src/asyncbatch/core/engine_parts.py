"""The engine's own value configs: where the model comes from, the KV cache, per-batch budgets, start-up.

Frozen attrs values, validated when built; `config.EngineConfig` holds one of each (and re-exports them).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from .errors import ConfigError
from .types import INT32_MAX, show

# torch.manual_seed's range (negative seeds are mapped to 2**64 + seed)
TORCH_SEED_MIN, TORCH_SEED_MAX = -(2**63), 2**64 - 1


def _positive(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise ConfigError(attribute.name, f"must be > 0, got {show(value)}")


def _size(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A positive count that the engine writes into int32 tables (token positions, KV slot indices, lengths)."""
    _positive(_, attribute, value)
    if value is not None and value > INT32_MAX:
        raise ConfigError(attribute.name, f"must be <= {INT32_MAX}, got {show(value)}")


def _fraction(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(attribute.name, f"must be in (0, 1], got {show(value)}")


def _torch_seed(_: Any, attribute: attrs.Attribute, value: int) -> None:
    if not TORCH_SEED_MIN <= value <= TORCH_SEED_MAX:
        raise ConfigError(attribute.name, f"must be in [{TORCH_SEED_MIN}, {TORCH_SEED_MAX}] (torch.manual_seed's "
                                          f"range), got {show(value)}")


MAX_THREADS = 4096


def threads_validator(_: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and not 1 <= value <= MAX_THREADS:
        raise ConfigError(attribute.name, f"must be between 1 and {MAX_THREADS} (or null: torch's default), "
                                          f"got {show(value)}")




@attrs.frozen
class ModelConfig:
    """Where the model comes from: a random-weight `preset` (built from a config) or a local pretrained checkpoint
    directory `path` (as written by `save_pretrained`). Give one of them, not both; with neither, the `tiny`
    preset is built.
    """

    # Not a field (no annotation): what neither `preset` nor `path` means. The fields keep what was given (`preset`
    # stays None when left out) so that a saved config, or a sweep cell that sets `path`, reloads the same way;
    # `source_preset` is the preset actually built.
    default_preset = "tiny"

    preset: str | None = None
    path: str | None = None
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = attrs.field(default=0, validator=_torch_seed)
    overrides: dict = attrs.Factory(dict)
    tokenizer: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.preset is not None and self.path is not None:
            raise ConfigError("model", f"give one of 'preset' (random weights, got {self.preset!r}) or 'path' "
                                       f"(local checkpoint, got {self.path!r}), not both")

    @property
    def source_preset(self) -> str | None:
        """The preset to build: `preset`, else `tiny` when no `path` is given; None for a checkpoint."""
        if self.path is not None:
            return None
        return self.preset if self.preset is not None else self.default_preset


@attrs.frozen
class CacheConfig:
    """Paged KV cache geometry. `num_blocks: null` sizes the cache from free device memory (CUDA) or
    `cpu_cache_tokens` (CPU)."""

    block_size: int = attrs.field(default=16, validator=_size)
    num_blocks: int | None = attrs.field(default=None, validator=_size)
    memory_fraction: float = attrs.field(default=0.85, validator=_fraction)
    cpu_cache_tokens: int = attrs.field(default=65536, validator=_size)
    max_model_len: int | None = attrs.field(default=None, validator=_size)

    def __attrs_post_init__(self) -> None:
        if self.num_blocks is not None and self.num_blocks < 2:  # at load time, so a sweep cell fails up front
            raise ConfigError("cache.num_blocks", f"needs at least 2 (block 0 is reserved for padding), got "
                                                  f"{self.num_blocks}")
        # A token's KV slot, block * block_size + offset, is written into an int32 table (the slot mapping).
        if self.num_blocks is not None and self.num_blocks * self.block_size > INT32_MAX:
            raise ConfigError("cache.num_blocks", f"num_blocks * block_size must be <= {INT32_MAX} (KV slot indices "
                                                  f"are int32), got {self.num_blocks} * {self.block_size} = "
                                                  f"{self.num_blocks * self.block_size}")


@attrs.frozen
class BatchConfig:
    """Per-batch budgets, shared by the scheduler (as its budget) and the buffers (as their size).

    `token_buckets` are the padded token counts a batch is rounded up to, so that graph keys repeat; every engine
    uses the same padding, so that all combinations compute the same numbers. Empty = automatic buckets.
    """

    max_tokens: int = attrs.field(default=2048, validator=_size)
    max_seqs: int = attrs.field(default=256, validator=_size)
    token_buckets: tuple[int, ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.max_seqs > self.max_tokens:
            raise ConfigError("batch.max_seqs", f"must be <= batch.max_tokens ({self.max_tokens}), got {self.max_seqs}")
        b = self.token_buckets
        if any(n <= 0 or n > INT32_MAX for n in b) or list(b) != sorted(set(b)):
            raise ConfigError("batch.token_buckets", f"must be strictly increasing positive ints <= {INT32_MAX}, "
                                                     f"got {show(b)}")

    def buckets(self) -> tuple[int, ...]:
        if self.token_buckets:
            top = [b for b in self.token_buckets if b < self.max_tokens]
            return (*top, self.max_tokens)
        out, b = [], 1
        while b < self.max_tokens:
            out.append(b)
            nxt = b * 2
            if b >= 16 and b + b // 2 < self.max_tokens:
                out.append(b + b // 2)
            b = nxt
        out.append(self.max_tokens)
        return tuple(sorted(set(out)))

    def pad_tokens(self, n: int) -> int:
        for b in self.buckets():
            if b >= n:
                return b
        raise ValueError(f"{n} tokens exceed batch.max_tokens={self.max_tokens}")


@attrs.frozen
class StartupConfig:
    """What building an engine does before any run is timed.

    `warmup`: `auto` compiles and captures, at build time, every step shape a run can need (every decode bucket up
    to `batch.max_seqs`, and every mixed-step shape the graph policy captures) where steps are captured in device
    graphs (the `cuda` runtime); `always` does it on every runtime (on `sim` it proves that a run captures
    nothing); `never` leaves compile and capture to the first steps that need them, inside the timed run.
    `compile_cache`: a directory that keeps torch.compile's artifacts across processes, so a second run of the
    same model starts in seconds (null: torch's own default; the `TORCHINDUCTOR_CACHE_DIR` variable wins).
    `progress`: a progress bar while warming up (on a terminal only).
    """

    warmup: Literal["auto", "always", "never"] = "auto"
    compile_cache: str | None = "~/.cache/asyncbatch/compile"
    progress: bool = True


@attrs.frozen
class ParallelConfig:
    """Scale-out over several processes. `data`: engine replicas, one process (and device) each; requests are
    shared out by least outstanding tokens and the results merged in input order. `tensor`: one model sharded
    over that many processes (attention heads and MLP features split, the KV cache by KV heads); with both above
    1, each replica is a tensor-parallel group of consecutive ranks. `asyncbatch run` starts the `data * tensor`
    processes itself (or runs under `torchrun` with as many ranks). `timeout_s`: how long any collective between
    the processes may wait before the run fails (a dead or stopped rank never hangs it). `all_reduce`: how
    tensor-parallel layers sum their partial outputs: `nccl` (a collective; gloo on the CPU), `one_shot` (every
    rank reads its peers' partials over NVLink through torch's symmetric memory, for small tensors such as a
    decode step's), `lamport` (the same without barriers: each value is its own arrival signal), `auto`
    (`lamport`, else `one_shot`, else `nccl`: the first every rank can run). `shard_lm_head`: split the output
    head by vocabulary over the tensor-parallel ranks and gather the logits, so each rank reads its share of the
    head instead of all of it (on by default: 3% off an 8B TP 2 step and 2.7% off a 70B TP 4 step on 4 × H100;
    `false` keeps the head whole on every rank)."""

    data: int = attrs.field(default=1, validator=_positive)
    tensor: int = attrs.field(default=1, validator=_positive)
    timeout_s: float = attrs.field(default=300.0, validator=_positive)
    all_reduce: Literal["auto", "nccl", "one_shot", "lamport"] = "auto"
    shard_lm_head: bool = True


def _max_waiting(_: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
        raise ConfigError(attribute.name, f"expected an int in [1, {2**31 - 1}] (requests queued for a row), "
                                          f"got {show(value)}")


def _timeout(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 86400:
        raise ConfigError(attribute.name, f"expected seconds in [0, 86400], got {show(value)}")


def _model_name(_: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(attribute.name, f"expected a non-empty string or null (the checkpoint path or preset "
                                          f"name), got {show(value)}")


@attrs.frozen
class ServeConfig:
    """`asyncbatch serve`: the live engine behind the HTTP server.

    `max_waiting`: requests that may wait for a row (submitted, not yet running) before new ones are refused with
    HTTP 429. `shutdown_timeout_s`: on shutdown, how long requests in flight may run on before they are cancelled.
    `model_name`: the id clients send as `model` and `/v1/models` lists (null: the checkpoint path, else the
    preset's name). `front_end`: where the HTTP side runs. `process` (the default): in a process of its own, which
    parses, tokenizes, detokenizes and streams, and hands requests and per-step token batches to the engine's
    process over a pipe, so none of that work competes with the step loop for the GIL. `thread`: in the engine's
    process, on an event loop beside the step loop's thread. `cpu_pinning` (front end `process`, a GPU model, Linux,
    at least 4 CPUs): `auto` gives the step loop one physical core to itself and keeps the front end and the engine
    process's other threads off it; `off` (the default) leaves placement to the kernel. It is off by default
    because on the one machine measured (an H100 VM whose 16 virtual CPUs show no shared cores) it changed nothing.
    """

    max_waiting: int = attrs.field(default=512, validator=_max_waiting)
    shutdown_timeout_s: float = attrs.field(default=30.0, validator=_timeout)
    model_name: str | None = attrs.field(default=None, validator=_model_name)
    front_end: Literal["process", "thread"] = "process"
    cpu_pinning: Literal["auto", "off"] = "off"
