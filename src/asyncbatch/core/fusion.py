"""Fused projections: q/k/v (and gate/up) of a decoder layer as one matrix product.

A decode step reads every weight once, and at small batch each projection is its own skinny GEMM: three launches
for q, k and v, two for gate and up, each with a tail that underuses the device. Concatenating the weights of
projections that read the same input turns them into one GEMM with the same bytes and fewer, fuller launches.

The model's own forward is left alone, so this works for any architecture whose attention and MLP call their
projections as submodules: each projection becomes a `FusedProjection` that shares its group's concatenated
weight. The group's first member computes the whole product and keeps it for the others, which take their
slice when called with the very same input tensor (the call order of the forward: q, k, v; gate, up). Called with
anything else, a member computes its own slice, so a forward with another call order is still correct. The last
member drops the kept product, so no activation outlives its layer. `torch.compile` traces the sharing into one
graph (the identity test and the attribute writes are resolved while tracing).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("asyncbatch")

# Sibling projections that read the same input, in the order the transformers forwards call them.
GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    """The concatenated weight (and bias) of sibling projections, and the product kept between their calls."""

    def __init__(self, weight: Any, bias: Any, bounds: list[tuple[int, int]]) -> None:
        self.weight, self.bias, self.bounds = weight, bias, bounds
        self.kept: tuple[Any, Any] | None = None
        self.linear: Any = None  # another GEMM with F.linear's signature (batch-invariant mode); None: F.linear
        # (sq, eps, pdl) for the next call only, set by a folded-norm layer (`norm_fold`): the input is an
        # RMSNorm's numerator, and the product divides each row by the norm's root mean square.
        self.row_scale: tuple[Any, float, bool] | None = None


def _member_class() -> type:
    import torch
    import torch.nn.functional as F

    class FusedProjection(torch.nn.Module):
        """One projection of a fused group: its output is a slice of the group's single matrix product."""

        def __init__(self, group: _Group, index: int, name: str) -> None:
            super().__init__()
            self.group, self.index, self.name = group, index, name
            self.lo, self.hi = group.bounds[index]
            self.last = index == len(group.bounds) - 1

        def forward(self, x: Any) -> Any:
            g = self.group
            kept = g.kept
            if kept is not None and kept[0] is x:
                out = kept[1]
            elif self.index == 0:
                scale = g.row_scale
                if scale is not None:
                    from .norm_fold_ops import ops

                    g.row_scale = None
                    out = ops()["scaled_linear"](x, scale[0], g.weight, g.bias, scale[1], scale[2])
                else:
                    out = (g.linear or F.linear)(x, g.weight, g.bias)
                g.kept = (x, out)
            else:  # called out of the group's order: compute this slice alone
                bias = None if g.bias is None else g.bias[self.lo:self.hi]
                scale = g.row_scale
                if scale is not None:
                    from .norm_fold_ops import ops

                    return ops()["scaled_linear"](x, scale[0], g.weight[self.lo:self.hi], bias, scale[1], scale[2])
                return (g.linear or F.linear)(x, g.weight[self.lo:self.hi], bias)
            if self.last:
                g.kept = None
            return out[..., self.lo:self.hi]

        def extra_repr(self) -> str:
            return f"{self.name}: rows {self.lo}:{self.hi} of a fused {tuple(self.group.weight.shape)} weight"

    return FusedProjection


_CLASS: type | None = None


def _fused_class() -> type:
    global _CLASS
    if _CLASS is None:
        _CLASS = _member_class()
    return _CLASS


def _fusible(parent: Any, names: tuple[str, ...]) -> list[Any] | None:
    import torch

    mods = [getattr(parent, n, None) for n in names]
    if not all(type(m) is torch.nn.Linear for m in mods):  # exactly Linear: quantized or custom layers keep theirs
        return None
    first = mods[0]
    same = all(m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None) for m in mods)
    return mods if same else None


def set_fused(model: Any, fused: bool) -> int:
    """Fuse (or unfuse) every group of sibling projections of `model` in place; returns how many groups changed.

    Idempotent, so engines sharing a model call it at the start of each run. Unfusing gives back plain
    `nn.Linear` modules whose weights are views of the fused weight (no copy, no extra memory)."""
    import torch

    changed = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for names in GROUPS:
                if fused:
                    mods = _fusible(parent, names)
                    if mods is None:
                        continue
                    weight = torch.nn.Parameter(torch.cat([m.weight for m in mods]), requires_grad=False)
                    bias = None
                    if mods[0].bias is not None:
                        bias = torch.nn.Parameter(torch.cat([m.bias for m in mods]), requires_grad=False)
                    edges = [0]
                    for m in mods:
                        edges.append(edges[-1] + m.out_features)
                    group = _Group(weight, bias, list(zip(edges, edges[1:])))
                    for i, name in enumerate(names):
                        setattr(parent, name, _fused_class()(group, i, name))
                    parent.register_parameter(f"_fused_{names[0]}", weight)  # counted, moved and saved once
                    if bias is not None:
                        parent.register_parameter(f"_fused_{names[0]}_bias", bias)
                    changed += 1
                else:
                    members = [getattr(parent, n, None) for n in names]
                    if not all(type(m).__name__ == "FusedProjection" for m in members):
                        continue
                    for name, m in zip(names, members):
                        g = m.group
                        linear = torch.nn.Linear(g.weight.shape[1], m.hi - m.lo, bias=g.bias is not None,
                                                 device="meta")
                        linear.weight = torch.nn.Parameter(g.weight[m.lo:m.hi], requires_grad=False)
                        if g.bias is not None:
                            linear.bias = torch.nn.Parameter(g.bias[m.lo:m.hi], requires_grad=False)
                        setattr(parent, name, linear)
                    delattr(parent, f"_fused_{names[0]}")
                    if members[0].group.bias is not None:
                        delattr(parent, f"_fused_{names[0]}_bias")
                    changed += 1
    if changed:
        log.info("%s %d projection groups of %s", "fused" if fused else "unfused", changed, type(model).__name__)
    return changed
