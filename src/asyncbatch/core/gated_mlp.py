"""A gated MLP's activation in the epilogue of its gate/up product (`engine.fuse_activation`).

Llama-family MLPs compute down(silu(gate(x)) * up(x)). With fused projections, gate and up are one product over the
concatenated [gate; up] weight, and then a kernel of its own reads both halves back and writes the activation: one
launch per layer (32 a decode step on an 8B Llama, about 2 us each on an H200) for a few kilobytes of work. Where
the decode GEMM kernel can compute the activation in its epilogue (`tma`), each such MLP is swapped for a twin whose
forward is `asyncbatch::gated_linear` (the product and the activation, one kernel) then the MLP's own `down_proj`.
Steps of more rows than the kernel takes (prefill chunks) compute the fused product with cuBLAS and the activation
after it, with the gate and up products rounded as the unfused path rounds them.

Which MLPs: those whose `gate_proj` and `up_proj` are the two members of one fused group, with a `down_proj` and a
SiLU `act_fn`, and whose own forward, on a probe input with `down_proj` set aside, gives what the twin gives. An
MLP that does anything else keeps its forward. The swap is in place and undone like the other swaps of a run.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("asyncbatch")

KERNELS = ("tma",)  # decode GEMM kernels with a gated epilogue
PROBE_TOLERANCE = 2e-2  # relative error between the MLP's forward and the twin's: one bf16 rounding apart

_OPS: dict[str, Any] = {}
_CLASS: type | None = None


def op() -> Any:
    """`asyncbatch::gated_linear(x, weight, bias, kernel, pdl)`: silu(gate) * up of `x @ weight.T + bias` for a
    [gate; up] weight, registered on first use (never inside a compiled region)."""
    if "op" in _OPS:
        return _OPS["op"]
    import torch
    import torch.nn.functional as F

    @torch.library.custom_op("asyncbatch::gated_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias, str kernel, bool pdl) -> Tensor")
    def gated_linear(x, weight, bias, kernel, pdl):  # noqa: ANN001, ANN202
        product = None
        if x.is_cuda and kernel == "tma":
            from . import decode_gemm_tma as tma

            if tma.unsupported(x, weight, gated=True) is None:
                return tma.matmul(x, weight, bias, gated=True, pdl=pdl)
            if tma.unsupported(x, weight) is None:  # rows the pairs cannot split: the plain product, then
                product = tma.matmul(x, weight, bias, pdl=pdl)
        gate, up = (F.linear(x, weight, bias) if product is None else product).chunk(2, -1)
        return (F.silu(gate.float()) * up.float()).to(x.dtype)

    @gated_linear.register_fake
    def _(x, weight, bias, kernel, pdl):  # noqa: ANN001, ANN202
        return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)

    _OPS["op"] = gated_linear
    return gated_linear


def _twin_class() -> type:
    import torch

    class GatedMLP(torch.nn.Module):
        """An MLP computed as `down_proj(gated_linear(x))`; it holds the original's fused weight and `down_proj`."""

        def __init__(self, original: Any, kernel: str, pdl: bool) -> None:
            super().__init__()
            group = original.gate_proj.group
            self.gate_up, self.gate_up_bias = group.weight, group.bias
            self.down_proj, self.kernel, self.pdl = original.down_proj, kernel, pdl
            object.__setattr__(self, "original", original)  # not a submodule: its parameters are ours

        def forward(self, x: Any) -> Any:
            return self.down_proj(_OPS["op"](x, self.gate_up, self.gate_up_bias, self.kernel, self.pdl))

    return GatedMLP


def _cls() -> type:
    global _CLASS
    if _CLASS is None:
        _CLASS = _twin_class()
    return _CLASS


def _shape_fits(mlp: Any) -> bool:
    """gate_proj and up_proj are the two halves of one fused group; down_proj and a SiLU act_fn exist."""
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    if type(gate).__name__ != "FusedProjection" or type(up).__name__ != "FusedProjection" or gate.group is not up.group:
        return False
    bounds = gate.group.bounds
    if len(bounds) != 2 or (gate.index, up.index) != (0, 1) or bounds[0][1] - bounds[0][0] != bounds[1][1] - bounds[1][0]:
        return False
    return getattr(mlp, "down_proj", None) is not None and \
        type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")


def _probe_agrees(mlp: Any, twin: Any) -> bool:
    """The MLP's own forward and the twin's activation agree on a random input, with down_proj set aside."""
    import torch

    weight = twin.gate_up
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(2, weight.shape[1], generator=gen, device=weight.device).to(weight.dtype)
    down = mlp.down_proj
    try:
        mlp.down_proj = torch.nn.Identity()
        with torch.no_grad():
            own = mlp(x).float()
            ours = _OPS["op"](x, weight, twin.gate_up_bias, twin.kernel, twin.pdl).float()
    except Exception as exc:  # noqa: BLE001 - an MLP whose forward cannot take the probe keeps its forward
        log.info("gated MLP: %s keeps its forward (the probe failed: %s)", type(mlp).__name__, exc)
        return False
    finally:
        mlp.down_proj = down
    if own.shape != ours.shape:
        return False
    return bool(((own - ours).norm() / own.norm().clamp_min(1e-30)).item() < PROBE_TOLERANCE)


def _twin(original: Any, kernel: str, pdl: bool) -> Any | None:
    """The MLP's twin (the same object at every swap: compiled layers guard on their submodules), or None where the
    MLP does not qualify (the verdict is kept on the module)."""
    twin = original.__dict__.get("_asyncbatch_gated")
    if twin is None:
        if original.__dict__.get("_asyncbatch_gated_refused") or not _shape_fits(original):
            return None
        twin = _cls()(original, kernel, pdl)
        if not _probe_agrees(original, twin):
            object.__setattr__(original, "_asyncbatch_gated_refused", True)
            return None
        object.__setattr__(original, "_asyncbatch_gated", twin)
    group = original.gate_proj.group
    twin.gate_up, twin.gate_up_bias, twin.down_proj = group.weight, group.bias, original.down_proj
    twin.kernel, twin.pdl = kernel, pdl
    return twin


def set_gated_mlp(model: Any, kernel: str, pdl: bool = False) -> int:
    """Swap every qualifying MLP of `model` for its gated twin running the decode GEMM `kernel` (one of `KERNELS`),
    or back to the original with "torch"; returns how many MLPs changed. Idempotent. Call it after the projections
    are fused and before they are unfused."""
    if kernel not in ("torch", *KERNELS):
        raise ValueError(f"gated MLP kernel {kernel!r}: valid are torch, {', '.join(KERNELS)}")
    on = kernel != "torch"
    if on:
        op()
    cls = _cls()
    changed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is cls:
                if on and (child.kernel, child.pdl) == (kernel, pdl):
                    continue
                target = _twin(child.original, kernel, pdl) if on else child.original
            elif on and hasattr(child, "gate_proj"):
                target = _twin(child, kernel, pdl)
                if target is None:
                    continue
            else:
                continue
            setattr(parent, name, target)
            changed += 1
    if changed:
        log.info("gated MLP activation %s in %d MLPs of %s", f"in the {kernel} epilogue" if on else "separate",
                 changed, type(model).__name__)
    return changed
