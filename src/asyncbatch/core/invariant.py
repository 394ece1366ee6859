"""Batch-invariant execution (`engine.batch_invariant: true`): a request's tokens do not depend on its batch.

In bfloat16 the same request can come out with different tokens depending on what shares its batch, because
cuBLAS and torch's reductions choose their algorithm (split-K, tile, instruction) from the problem's shape, and a
different reduction order rounds differently. Every operation of a decoder step that reduces across a row is
therefore replaced by one whose order is fixed by the row alone:

* every `torch.nn.Linear` (and every fused projection group) becomes a Triton GEMM with one K-chunk size and no
  split-K (`invariant_kernels.matmul`; the tile may follow the row count, which does not change a row's bits);
* every RMSNorm becomes a Triton kernel with one program per row;
* attention runs the backend's invariant mode (`AttentionBackend.make_batch_invariant`): one kernel, one tile
  shape and one KV chunk order for decode and mixed steps alike;
* sampling already is per row (argmax, and counter-based noise: see `sampling`).

Everything else in a step is elementwise or a gather, which does not round differently with the batch. Prefill
chunk boundaries then do not matter either: a prompt token's K/V and attention output are the same whichever step
computed them. The swaps are applied in place, like fusion, at the start of every run and undone by `release()`.
The kernels and the custom ops that wrap them (opaque to `torch.compile`, capturable in CUDA graphs) load lazily.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import UnsupportedError

log = logging.getLogger("asyncbatch")

_OPS: dict[str, Any] = {}


def check_supported(device: Any) -> None:
    """Raise `UnsupportedError` naming what is missing when batch-invariant mode cannot run here."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        raise UnsupportedError(f"engine.batch_invariant needs a CUDA device (its kernels are Triton kernels); the "
                               f"model is on {device}")
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise UnsupportedError(f"engine.batch_invariant needs triton ({exc}); pip install 'asyncbatch[gpu]'") from None


def ops() -> dict[str, Any]:
    """`asyncbatch::invariant_linear` and `asyncbatch::invariant_rms_norm`, registered on first use (never inside a
    compiled region: registering there would break the graph)."""
    if _OPS:
        return _OPS
    import torch

    # The kernels module is looked up at each call (eager calls only: replays run no Python), so that tests can
    # load it under Triton's interpreter without the ops keeping that copy.
    @torch.library.custom_op("asyncbatch::invariant_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    def invariant_linear(x, weight, bias):  # noqa: ANN001, ANN202
        from . import invariant_kernels as kernels

        return kernels.matmul(x, weight, bias, kernels.invariant_config(x.numel() // x.shape[-1]))

    @invariant_linear.register_fake
    def _(x, weight, bias):  # noqa: ANN001, ANN202
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.custom_op("asyncbatch::invariant_rms_norm", mutates_args=(),
                             schema="(Tensor x, Tensor weight, float eps) -> Tensor")
    def invariant_rms_norm(x, weight, eps):  # noqa: ANN001, ANN202
        from . import invariant_kernels as kernels

        return kernels.rms_norm(x, weight, eps)

    @invariant_rms_norm.register_fake
    def _(x, weight, eps):  # noqa: ANN001, ANN202
        return x.new_empty(x.shape, dtype=torch.result_type(weight, x))

    _OPS.update(linear=invariant_linear, rms_norm=invariant_rms_norm)
    return _OPS


def _classes() -> tuple[type, type]:
    import torch

    class InvariantLinear(torch.nn.Module):
        """A `Linear` computed by the batch-invariant GEMM; it holds the original module's parameters."""

        def __init__(self, original: Any) -> None:
            super().__init__()
            self.weight, self.bias = original.weight, original.bias
            self.in_features, self.out_features = original.in_features, original.out_features
            object.__setattr__(self, "original", original)  # not a submodule: its parameters are ours

        def forward(self, x: Any) -> Any:
            return _OPS["linear"](x, self.weight, self.bias)

    class InvariantRMSNorm(torch.nn.Module):
        """transformers' RMSNorm computed one row per program; it holds the original module's weight."""

        def __init__(self, original: Any) -> None:
            super().__init__()
            self.weight = original.weight
            self.variance_epsilon = float(original.variance_epsilon)
            object.__setattr__(self, "original", original)

        def forward(self, x: Any) -> Any:
            return _OPS["rms_norm"](x, self.weight, self.variance_epsilon)

    return InvariantLinear, InvariantRMSNorm


_CLASSES: tuple[type, type] | None = None


def _invariant_classes() -> tuple[type, type]:
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _classes()
    return _CLASSES


def _is_llama_rms_norm(module: Any) -> bool:
    """The RMSNorm form of Llama, Mistral and Qwen2/3 (`weight * normalised.to(dtype)`, `variance_epsilon`)."""
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and getattr(module, "weight", None) is not None and not hasattr(module, "bias"))


def unsupported_modules(model: Any) -> list[str]:
    """Class names of normalisation layers with no batch-invariant kernel here (they would reduce per batch)."""
    odd = set()
    for module in model.modules():
        name = type(module).__name__
        if "Norm" in name and not _is_llama_rms_norm(module) and name != "InvariantRMSNorm":
            odd.add(name)
    return sorted(odd)


def _wrapper(original: Any, cls: type) -> Any:
    """The module's invariant twin, the same object at every swap: compiled layers guard on their submodules, so
    a new object each run would recompile them."""
    twin = original.__dict__.get("_asyncbatch_invariant")
    if twin is None:
        twin = cls(original)
        object.__setattr__(original, "_asyncbatch_invariant", twin)  # not a submodule of the original
    else:
        twin.weight = original.weight
        if hasattr(original, "bias"):
            twin.bias = original.bias
    return twin


def set_batch_invariant(model: Any, on: bool) -> int:
    """Swap every Linear, fused projection group and RMSNorm of `model` to (`on`) or from the invariant kernels, in
    place; returns how many modules changed. Idempotent; engines sharing a model call it at every run."""
    import torch

    linear_cls, norm_cls = _invariant_classes()
    if on:
        odd = unsupported_modules(model)
        if odd:
            raise UnsupportedError(f"engine.batch_invariant: no batch-invariant kernel for {', '.join(odd)} in "
                                   f"{type(model).__name__} (supported: Linear and the Llama/Mistral/Qwen RMSNorm)")
        ops()
    changed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if on and type(child) is torch.nn.Linear:
                setattr(parent, name, _wrapper(child, linear_cls))
            elif on and _is_llama_rms_norm(child) and type(child) is not norm_cls:
                setattr(parent, name, _wrapper(child, norm_cls))
            elif not on and type(child) in (linear_cls, norm_cls):
                original = child.original
                original.weight = child.weight  # moved or replaced while swapped: keep the current tensors
                if type(child) is linear_cls:
                    original.bias = child.bias
                setattr(parent, name, original)
            elif type(child).__name__ == "FusedProjection" and child.index == 0:
                if (child.group.linear is not None) != on:
                    child.group.linear = _OPS["linear"] if on else None
                    changed += 1
                continue
            else:
                continue
            changed += 1
    if changed:
        log.info("batch-invariant kernels %s in %d modules of %s", "on" if on else "off", changed,
                 type(model).__name__)
    return changed
