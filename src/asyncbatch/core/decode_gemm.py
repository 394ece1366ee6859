"""Decode GEMMs in Triton and programmatic dependent launch (`engine.decode_gemm`, `engine.pdl`).

A decode step on an 8B model is ~130 bandwidth-bound matrix products of 10-90 us each, with small kernels (norms,
rotary, activations, attention) between them. cuBLAS picks a good kernel for each, but every launch still pays
a ramp-up and a tail in which the memory system is idle, and its kernels are not made for 1-32 rows. Two switches:

* `decode_gemm`: the decoder layers' projections (every `Linear` but the output embedding, fused groups included)
  run a Triton kernel made for few rows, and cuBLAS beyond its row limit (prefill chunks):
  `triton` is `decode_gemm_kernels.matmul` (the batch on the MMA's M side, ordinary loads, at most 64 rows);
  `tma` is `decode_gemm_tma.matmul` (weight rows on the M side, bulk tensor copies, K split by a rule; Hopper and
  newer, bf16/fp16, at most 32 rows).
* `pdl`: on Hopper and newer, those GEMMs and the Triton attention kernels are launched as programmatic
  dependent launches: a kernel's programs are scheduled while its predecessor finishes and wait on the device for
  its writes, instead of the launch waiting for it. Inductor can do the same for the kernels it generates
  (`torch._inductor.config.triton.enable_pdl`); that is left off: it gained nothing measurable in the engine, and
  in one H100 run it changed bf16 tokens next to cuBLAS products, which a change of launch order must never do.

Neither changes a result beyond the kernel's own rounding: PDL only moves launches, and neither kernel's bits
depend on the batch or the tile (K chunks, and K splits, are summed in a fixed order). Which pays depends on the
card, so `auto` picks per card from `MEASURED_FASTER`, what was measured faster inside the engine there: on an H100
SXM `triton` with PDL; on an H200 `tma` without it (the `triton` kernel lost to cuBLAS there by 3-5%). Every other
card keeps cuBLAS and ordinary launches.

The swap is applied in place at the start of every run, like fusion, and undone by `release()`; the op that wraps
the kernels (opaque to `torch.compile`, capturable in CUDA graphs) registers on first use.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import UnsupportedError

log = logging.getLogger("asyncbatch")

_OPS: dict[str, Any] = {}


KERNELS = ("triton", "tma")  # the Triton kernels `decode_gemm` can run; "torch" is cuBLAS through F.linear


def unsupported_reason(device: Any, *, dependent_launch: bool = False, kernel: str = "triton") -> str | None:
    """Why `kernel` (or, with `dependent_launch`, PDL) cannot run on `device`; None when it can."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return f"needs a CUDA device, the model is on {device}"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"needs triton ({exc}); pip install 'asyncbatch[gpu]'"
    capability = torch.cuda.get_device_capability(device)
    need = "programmatic dependent launch" if dependent_launch else "the tensor memory accelerator" \
        if kernel == "tma" else None
    if need and capability < (9, 0):
        return f"needs compute capability >= 9.0 (Hopper) for {need}; {torch.cuda.get_device_name(device)} has " \
               f"{'.'.join(map(str, capability))}"
    return None


# `torch.cuda.get_device_name` of the cards where `auto` runs a Triton decode GEMM: (kernel, PDL) as measured
# fastest inside the engine there. H100 SXM: `triton` with PDL (decode step at batch 1: -3.3%; batch 32: -0.2 to
# -2.4%; a TP 2 rank's shapes: -1.1%). H200: `tma` without PDL (see docs/benchmarks.md; PDL did not pay with it).
MEASURED_FASTER = {"NVIDIA H100 80GB HBM3": ("triton", True), "NVIDIA H200": ("tma", False)}


def auto_choice(device: Any) -> tuple[str, bool]:
    """(kernel, pdl) that `auto` picks on `device`: its `MEASURED_FASTER` entry where both can run, else cuBLAS."""
    import torch

    if unsupported_reason(device) is not None:
        return "torch", False
    kernel, pdl = MEASURED_FASTER.get(torch.cuda.get_device_name(device), ("torch", False))
    if kernel != "torch" and unsupported_reason(device, dependent_launch=pdl, kernel=kernel) is not None:
        return "torch", False
    return kernel, pdl


def decide(config: Any, device: Any, captured: bool = True) -> tuple[str, bool]:
    """(decode GEMM kernel, pdl) for an engine with `config` on `device`; the kernel is "torch" for cuBLAS.

    `auto` for `decode_gemm` is the card's `MEASURED_FASTER` kernel where the engine's decode steps are `captured`
    in CUDA graphs (unless `batch_invariant`, whose GEMMs are its own), else `torch`: every measurement was of
    replayed steps, and launched from Python a Triton kernel costs more host time than cuBLAS, in steps whose
    time is the host's. `auto` for `pdl` is what was measured with that kernel on that card; with an explicit
    `triton` it is on where the card supports it (beside cuBLAS products, PDL on attention alone measured no gain).
    A value that cannot be honoured here raises `UnsupportedError` naming the key."""
    wants_auto = "auto" in (config.decode_gemm, config.pdl)
    auto_kernel, auto_pdl = auto_choice(device) if wants_auto and captured else ("torch", False)
    if config.decode_gemm == "auto":
        kernel = "torch" if config.batch_invariant else auto_kernel
    else:
        kernel = config.decode_gemm
        if kernel != "torch" and config.batch_invariant:
            raise UnsupportedError(f"engine.decode_gemm: '{kernel}' cannot be combined with engine.batch_invariant, "
                                   "whose GEMMs are its own (valid there: auto, torch)")
        reason = unsupported_reason(device, kernel=kernel) if kernel != "torch" else None
        if reason:
            raise UnsupportedError(f"engine.decode_gemm: '{kernel}' {reason}")
    if config.pdl == "auto":
        if kernel == auto_kernel:
            pdl = auto_pdl
        else:
            pdl = kernel == "triton" and unsupported_reason(device, dependent_launch=True) is None
    else:
        pdl = config.pdl == "always"
        reason = unsupported_reason(device, dependent_launch=True) if pdl else None
        if reason:
            raise UnsupportedError(f"engine.pdl: 'always' {reason}")
    return kernel, pdl


def ops() -> dict[str, Any]:
    """`asyncbatch::decode_linear`, registered on first use (never inside a compiled region), and the
    `F.linear`-shaped callables that fused projection groups call, one per (kernel, pdl) (one object each:
    compiled layers guard on it)."""
    if _OPS:
        return _OPS
    import torch
    import torch.nn.functional as F

    @torch.library.custom_op("asyncbatch::decode_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias, str kernel, bool pdl) -> Tensor")
    def decode_linear(x, weight, bias, kernel, pdl):  # noqa: ANN001, ANN202
        if x.is_cuda and kernel == "tma":
            from . import decode_gemm_tma as tma

            if tma.unsupported(x, weight) is None:
                return tma.matmul(x, weight, bias, pdl=pdl)
        elif x.is_cuda:
            from . import decode_gemm_kernels as kernels

            if x.numel() // max(1, x.shape[-1]) <= kernels.MAX_ROWS:
                return kernels.matmul(x, weight, bias, pdl=pdl)
        return F.linear(x, weight, bias)

    @decode_linear.register_fake
    def _(x, weight, bias, kernel, pdl):  # noqa: ANN001, ANN202
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def linear(kernel: str, pdl: bool) -> Any:
        def call(x, weight, bias=None):  # noqa: ANN001, ANN202
            return decode_linear(x, weight, bias, kernel, pdl)
        return call

    _OPS.update(op=decode_linear, linear={(k, p): linear(k, p) for k in KERNELS for p in (False, True)})
    return _OPS


def _twin_class() -> type:
    import torch

    class DecodeLinear(torch.nn.Module):
        """A `Linear` computed by `asyncbatch::decode_linear`; it holds the original module's parameters."""

        def __init__(self, original: Any, kernel: str, pdl: bool) -> None:
            super().__init__()
            self.weight, self.bias, self.kernel, self.pdl = original.weight, original.bias, kernel, pdl
            self.in_features, self.out_features = original.in_features, original.out_features
            object.__setattr__(self, "original", original)  # not a submodule: its parameters are ours

        def forward(self, x: Any) -> Any:
            return _OPS["op"](x, self.weight, self.bias, self.kernel, self.pdl)

    return DecodeLinear


_CLASS: type | None = None


def _cls() -> type:
    global _CLASS
    if _CLASS is None:
        _CLASS = _twin_class()
    return _CLASS


def _twin(original: Any, kernel: str, pdl: bool) -> Any:
    """The module's twin, the same object at every swap (compiled layers guard on their submodules)."""
    twin = original.__dict__.get("_asyncbatch_decode_gemm")
    if twin is None:
        twin = _cls()(original, kernel, pdl)
        object.__setattr__(original, "_asyncbatch_decode_gemm", twin)
    twin.weight, twin.bias, twin.kernel, twin.pdl = original.weight, original.bias, kernel, pdl
    return twin


def set_decode_gemm(model: Any, kernel: str, pdl: bool = False) -> int:
    """Swap every `Linear` of `model` but its output embedding, and every fused projection group, to the Triton
    decode GEMM `kernel` (one of `KERNELS`), or back to torch's with "torch", in place; returns how many modules
    changed. Idempotent."""
    import torch

    if kernel not in ("torch", *KERNELS):
        raise ValueError(f"decode GEMM kernel {kernel!r}: valid are torch, {', '.join(KERNELS)}")
    on = kernel != "torch"
    if on:
        ops()
    cls = _cls()
    ours = set(_OPS.get("linear", {}).values())
    skip = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    changed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if on and type(child) is torch.nn.Linear and child is not skip:
                setattr(parent, name, _twin(child, kernel, pdl))
            elif type(child) is cls and (not on or (child.kernel, child.pdl) != (kernel, pdl)):
                original = child.original
                original.weight, original.bias = child.weight, child.bias  # moved or replaced while swapped
                setattr(parent, name, _twin(original, kernel, pdl) if on else original)
            elif type(child).__name__ == "FusedProjection" and child.index == 0:
                current = child.group.linear
                want = _OPS["linear"][kernel, pdl] if on else None
                if current is want or (current is not None and current not in ours):
                    continue  # already so, or batch-invariant mode's GEMM: not ours to replace or undo
                child.group.linear = want
            else:
                continue
            changed += 1
    if changed:
        log.info("decode GEMMs %s in %d modules of %s%s", kernel, changed, type(model).__name__,
                 " (programmatic dependent launch)" if on and pdl else "")
    return changed
