"""Decode GEMMs in Triton and programmatic dependent launch (`engine.decode_gemm`, `engine.pdl`).

A decode step on an 8B model is ~130 bandwidth-bound matrix products of 10-90 us each, with small kernels (norms,
rotary, activations, attention) between them. cuBLAS picks a good kernel for each, but every launch still pays
a ramp-up and a tail in which the memory system is idle. Two switches aim at them, both off unless asked for:

* `decode_gemm`: the decoder layers' projections (every `Linear` but the output embedding, fused groups included)
  run `decode_gemm_kernels.matmul` when a step has at most `MAX_ROWS` rows, and cuBLAS beyond (prefill chunks).
* `pdl`: on Hopper and newer, those GEMMs and the Triton attention kernels are launched as programmatic
  dependent launches: a kernel's programs are scheduled while its predecessor finishes and wait on the device for
  its writes, instead of the launch waiting for it. Inductor can do the same for the kernels it generates
  (`torch._inductor.config.triton.enable_pdl`); that is left off: it gained nothing measurable in the engine, and
  in one H100 run it changed bf16 tokens next to cuBLAS products, which a change of launch order must never do.

Neither changes a result: PDL only moves launches, and a GEMM's bits do not depend on its tile's width or on
whether it was launched early (the K chunks are summed in the same order). Whether they pay depends on the card,
so `auto` turns them on only on cards where they were measured faster inside the engine (`MEASURED_FASTER`):
on an H100 SXM, 0.2-3% shorter decode steps at 1-32 sequences, and 1% for one tensor-parallel rank's share of
the 8B shape. On an H200 no tile of this kernel beat cuBLAS there (3-5% slower), so `auto` keeps cuBLAS and
ordinary launches on it and on every card not measured.

The swap is applied in place at the start of every run, like fusion, and undone by `release()`; the op that wraps
the kernel (opaque to `torch.compile`, capturable in CUDA graphs) registers on first use.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import UnsupportedError

log = logging.getLogger("asyncbatch")

_OPS: dict[str, Any] = {}


def unsupported_reason(device: Any, *, dependent_launch: bool) -> str | None:
    """Why the Triton decode GEMM (or, with `dependent_launch`, PDL) cannot run on `device`; None when it can."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return f"needs a CUDA device, the model is on {device}"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"needs triton ({exc}); pip install 'asyncbatch[gpu]'"
    if dependent_launch and torch.cuda.get_device_capability(device) < (9, 0):
        name = torch.cuda.get_device_name(device)
        return f"needs compute capability >= 9.0 (Hopper) for programmatic dependent launch; {name} has " \
               f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
    return None


# `torch.cuda.get_device_name` of the cards where `auto` turns both switches on: an H100 SXM's, where every
# in-engine comparison favoured them (batch 1: -3.3%; batch 32: -0.2 to -2.4%; a TP 2 rank's shapes: -1.1%).
MEASURED_FASTER = frozenset({"NVIDIA H100 80GB HBM3"})


def auto_on(device: Any) -> bool:
    """Whether `auto` runs the Triton decode GEMM with PDL on `device`: a card of `MEASURED_FASTER` that can."""
    import torch

    if unsupported_reason(device, dependent_launch=True) is not None:
        return False
    return torch.cuda.get_device_name(device) in MEASURED_FASTER


def decide(config: Any, device: Any) -> tuple[bool, bool]:
    """(decode_gemm, pdl) for an engine with `config` on `device`.

    `auto` for `decode_gemm` is `triton` on the cards of `MEASURED_FASTER` (unless `batch_invariant`, whose GEMMs
    are its own), else `torch`. `auto` for `pdl` follows the GEMM: on where the Triton GEMM runs and the card
    supports it (beside cuBLAS products, PDL on attention alone measured no gain). A value that cannot be
    honoured here raises `UnsupportedError` naming the key."""
    if config.decode_gemm == "auto":
        gemm = not config.batch_invariant and auto_on(device)
    else:
        gemm = config.decode_gemm == "triton"
        if gemm and config.batch_invariant:
            raise UnsupportedError("engine.decode_gemm: 'triton' cannot be combined with engine.batch_invariant, "
                                   "whose GEMMs are its own (valid there: auto, torch)")
        reason = unsupported_reason(device, dependent_launch=False) if gemm else None
        if reason:
            raise UnsupportedError(f"engine.decode_gemm: 'triton' {reason}")
    if config.pdl == "auto":
        pdl = gemm and unsupported_reason(device, dependent_launch=True) is None
    else:
        pdl = config.pdl == "always"
        reason = unsupported_reason(device, dependent_launch=True) if pdl else None
        if reason:
            raise UnsupportedError(f"engine.pdl: 'always' {reason}")
    return gemm, pdl


def ops() -> dict[str, Any]:
    """`asyncbatch::decode_linear`, registered on first use (never inside a compiled region), and the two
    `F.linear`-shaped callables that fused projection groups call (one object each: compiled layers guard on it)."""
    if _OPS:
        return _OPS
    import torch
    import torch.nn.functional as F

    @torch.library.custom_op("asyncbatch::decode_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias, bool pdl) -> Tensor")
    def decode_linear(x, weight, bias, pdl):  # noqa: ANN001, ANN202
        from . import decode_gemm_kernels as kernels

        if x.is_cuda and x.numel() // max(1, x.shape[-1]) <= kernels.MAX_ROWS:
            return kernels.matmul(x, weight, bias, pdl=pdl)
        return F.linear(x, weight, bias)

    @decode_linear.register_fake
    def _(x, weight, bias, pdl):  # noqa: ANN001, ANN202
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def plain(x, weight, bias=None):  # noqa: ANN001, ANN202
        return decode_linear(x, weight, bias, False)

    def dependent(x, weight, bias=None):  # noqa: ANN001, ANN202
        return decode_linear(x, weight, bias, True)

    _OPS.update(op=decode_linear, linear={False: plain, True: dependent})
    return _OPS


def _twin_class() -> type:
    import torch

    class DecodeLinear(torch.nn.Module):
        """A `Linear` computed by `asyncbatch::decode_linear`; it holds the original module's parameters."""

        def __init__(self, original: Any, pdl: bool) -> None:
            super().__init__()
            self.weight, self.bias, self.pdl = original.weight, original.bias, pdl
            self.in_features, self.out_features = original.in_features, original.out_features
            object.__setattr__(self, "original", original)  # not a submodule: its parameters are ours

        def forward(self, x: Any) -> Any:
            return _OPS["op"](x, self.weight, self.bias, self.pdl)

    return DecodeLinear


_CLASS: type | None = None


def _cls() -> type:
    global _CLASS
    if _CLASS is None:
        _CLASS = _twin_class()
    return _CLASS


def _twin(original: Any, pdl: bool) -> Any:
    """The module's twin, the same object at every swap (compiled layers guard on their submodules)."""
    twin = original.__dict__.get("_asyncbatch_decode_gemm")
    if twin is None:
        twin = _cls()(original, pdl)
        object.__setattr__(original, "_asyncbatch_decode_gemm", twin)
    twin.weight, twin.bias, twin.pdl = original.weight, original.bias, pdl
    return twin


def set_decode_gemm(model: Any, on: bool, pdl: bool = False) -> int:
    """Swap every `Linear` of `model` but its output embedding, and every fused projection group, to (`on`) or
    from the Triton decode GEMM, in place; returns how many modules changed. Idempotent."""
    import torch

    if on:
        ops()
    cls = _cls()
    ours = set(_OPS.get("linear", {}).values())
    skip = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    changed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if on and type(child) is torch.nn.Linear and child is not skip:
                setattr(parent, name, _twin(child, pdl))
            elif type(child) is cls and (not on or child.pdl != pdl):
                original = child.original
                original.weight, original.bias = child.weight, child.bias  # moved or replaced while swapped
                setattr(parent, name, _twin(original, pdl) if on else original)
            elif type(child).__name__ == "FusedProjection" and child.index == 0:
                current = child.group.linear
                want = _OPS["linear"][pdl] if on else None
                if current is want or (current is not None and current not in ours):
                    continue  # already so, or batch-invariant mode's GEMM: not ours to replace or undo
                child.group.linear = want
            else:
                continue
            changed += 1
    if changed:
        log.info("decode GEMMs %s in %d modules of %s%s", "triton" if on else "torch", changed,
                 type(model).__name__, " (programmatic dependent launch)" if on and pdl else "")
    return changed
