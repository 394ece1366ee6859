"""Paged attention in Triton: flash-decoding for decode steps, query-tiled causal attention for mixed steps.

No mask tensor and no gathered context: the kernels read each sequence's blocks through the block table and stop
at its real length, so the launch depends only on the step's padded shape (`needs_kv_blocks = False`: one graph
serves every context length). The kernels live in `triton_kernels`, imported on first use so that asyncbatch
imports without triton.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from ...core.errors import UnsupportedError
from ...core.interfaces import AttentionBackend


def _pos(_inst: Any, attribute: Any, value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


def _pow2_at_least_16(_inst: Any, attribute: Any, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{attribute.name} must be a power of two >= 16, got {value}")


@attrs.frozen
class TritonPagedConfig:
    """`num_splits`: kv splits per sequence in decode steps (0 = from the batch size and the SM count).
    `block_n`: context positions per inner-loop chunk. `num_warps`, `num_stages`: Triton launch options of the
    attention kernel. `waves`: decode programs aimed at per SM when choosing splits (0: the value measured best on
    this card, `MEASURED_WAVES`, else `DEFAULT_WAVES`). `fuse_combine`: the last
    split of a sequence to finish combines the splits (true; up to 8 splits, more keep the second kernel), or a
    second kernel always does (false). `fuse_cache_write`: in decode steps the attention kernel writes the step's
    K/V into the cache itself (`always`), or a separate kernel writes them first (`never`); `auto` fuses where the
    step splits each context (see `FUSE_WRITE_MIN_SPLITS`)."""

    num_splits: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    block_n: int = attrs.field(default=64, validator=_pow2_at_least_16)
    num_warps: int = attrs.field(default=4, validator=_pos)
    num_stages: int = attrs.field(default=2, validator=_pos)
    waves: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    fuse_combine: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    fuse_cache_write: Literal["auto", "always", "never"] = "auto"


MAX_SPLITS = 64
DEFAULT_WAVES = 4  # on an H100, 8 and 16 waves were slower (batch 32, contexts 512-4,096)
# `torch.cuda.get_device_name`: waves measured best there. H200, batch 32: 2 waves (2 splits instead of 3) made the
# kernel 3-13% faster at contexts 256-2,048 and the 8B decode step 1.2% shorter; batch 1 unchanged.
MEASURED_WAVES = {"NVIDIA H200": 2}
# Dependent launch pays beside short kernels: steps of this many tokens at most (decode GEMMs run in Triton up to
# the same count). At 256 sequences, beside cuBLAS products, it made an H100's step 1% slower.
PDL_MAX_TOKENS = 64
# `fuse_cache_write: auto` fuses from this many decode splits on. Only the split holding the new position does the
# write, so with one split every program adds it to its tail: on an H200 (8B, 128-token prompts) the fused write
# made the decode step 1.0% shorter at batch 32 (2 splits) and 0.6-1.4% longer at batch 256 (1 split).
FUSE_WRITE_MIN_SPLITS = 2
SM_COUNT_OFF_CUDA = 8  # the interpreter (tests) has no SMs; a small number still exercises the split path


class TritonPaged(AttentionBackend):
    """Triton paged attention (CUDA; also runs on CPU tensors under TRITON_INTERPRET=1 for testing)."""

    Config = TritonPagedConfig
    needs_kv_blocks = False
    needs_max_query = False  # mixed steps: programs find their sequence on the device
    applies_rotary = True  # q on load, K on its way into the cache (`triton_rows._rope`)
    auto_priority = 50

    def __init__(self, config: TritonPagedConfig | None = None) -> None:
        self.config = config or TritonPagedConfig()
        self._sm_count: dict[Any, int] = {}
        self.invariant = False
        self.pdl = False  # programmatic dependent launch (`use_dependent_launch`)
        # Split counters of the fused combine, per device. Each backend serves one engine, whose attention launches
        # never overlap, so one buffer serves them all. Buffers are kept for good: captured graphs hold their
        # addresses.
        self.split_counters: dict[Any, list[Any]] = {}

    def make_batch_invariant(self) -> None:
        """One kernel path for every step: query tiles of 16 rows, the context in BLOCK_N chunks from position 0,
        no split (a split count chosen from the batch would change a token's reduction order)."""
        self.invariant = True

    def use_dependent_launch(self, on: bool) -> None:
        self.pdl = on

    def check(self, device: Any, dtype: Any, head_dim: int, block_size: int) -> None:
        import torch

        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise UnsupportedError(f"the triton backend needs a CUDA device, got {device} "
                                   f"(CUDA available: {torch.cuda.is_available()})")
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise UnsupportedError(f"triton is not importable ({exc}); pip install 'asyncbatch[gpu]'") from None
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise UnsupportedError(f"the triton backend needs float16, bfloat16 or float32, the model is {dtype}")
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
            raise UnsupportedError("the triton backend needs compute capability >= 8.0 for bfloat16")
        if not 16 <= head_dim <= 256:
            raise UnsupportedError(f"the triton backend needs 16 <= head_dim <= 256, the model has {head_dim}")
        if block_size < 1:
            raise UnsupportedError(f"the triton backend needs a positive KV block size, got {block_size}")

    def num_splits(self, device: Any, num_seqs: int, kv_heads: int, max_blocks: int, block_size: int) -> int:
        """Decode splits from static quantities only: enough programs to fill the GPU `waves` times over, no more
        than the chunks of the longest possible context (splits past a sequence's real length exit at once)."""
        if self.config.num_splits:
            want = self.config.num_splits
        else:
            target = (self.config.waves or self._waves(device)) * self._sms(device)
            want = -(-target // (num_seqs * kv_heads))
        chunks = -(-(max_blocks * block_size) // self.config.block_n)
        return max(1, min(want, chunks, MAX_SPLITS))

    @staticmethod
    def _waves(device: Any) -> int:
        import torch

        if device.type != "cuda":
            return DEFAULT_WAVES
        return MEASURED_WAVES.get(torch.cuda.get_device_name(device), DEFAULT_WAVES)

    def _sms(self, device: Any) -> int:
        if device not in self._sm_count:
            import torch

            self._sm_count[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                                      if device.type == "cuda" else SM_COUNT_OFF_CUDA)
        return self._sm_count[device]

    def forward(self, q: Any, k: Any, v: Any, k_cache: Any, v_cache: Any, meta: Any, *, scale: float,
                sliding_window: int | None, rotary: tuple[Any, Any] | None = None) -> Any:
        from . import triton_kernels

        if rotary is not None and not triton_kernels.rotary_fits(q.shape[-1], rotary):
            from ...core.attention_api import apply_rotary

            q, k = apply_rotary(q, k, *rotary)
            rotary = None
        pdl = self.pdl and q.is_cuda and q.shape[0] <= PDL_MAX_TOKENS
        cfg = self.config
        decode = meta.max_query == 1 and not self.invariant
        num_seqs, max_blocks = meta.block_table.shape
        splits = 1
        if decode:
            splits = self.num_splits(q.device, num_seqs, k.shape[1], max_blocks, k_cache.shape[1])
        fuse_write = decode and (cfg.fuse_cache_write == "always" or
                                 (cfg.fuse_cache_write == "auto" and splits >= FUSE_WRITE_MIN_SPLITS))
        if not fuse_write:
            triton_kernels.write_cache(k, v, k_cache, v_cache, meta.slot_mapping, pdl=pdl, rotary=rotary)
        counters = (lambda n: self._counters(q.device, n)) if cfg.fuse_combine else None
        return triton_kernels.attention(q, k_cache, v_cache, meta, scale=scale, sliding_window=sliding_window,
                                        splits=splits, block_n=cfg.block_n, num_warps=cfg.num_warps,
                                        num_stages=cfg.num_stages, invariant=self.invariant, counters=counters,
                                        pdl=pdl, new_kv=(k, v) if fuse_write else None, rotary=rotary)

    def _counters(self, device: Any, need: int) -> Any:
        """A zeroed int32 buffer of at least `need` split counters on `device` (see `split_counters`)."""
        import torch

        pool = self.split_counters.setdefault(device, [])
        for buf in pool:
            if buf.numel() >= need:
                return buf
        pool.append(torch.zeros(max(need, 1 << 12), device=device, dtype=torch.int32))
        return pool[-1]
