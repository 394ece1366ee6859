"""The two custom ops of folded RMSNorms (`norm_fold`), each with the `tma` kernel's epilogue or a torch fallback.

* `asyncbatch::residual_linear(x, W, b, residual, gamma)` -> (h, g, sq): a decoder layer's o or down projection
  with its residual add, h = residual + (x W^T + b); with the next RMSNorm's gamma, also that norm's numerator
  g = h * gamma and sq [strips, rows], per-strip float32 sums of h^2 (without: g and sq are empty).
* `asyncbatch::scaled_linear(g, sq, W, b, eps)` -> (g W^T) * rsqrt(sum(sq) / K + eps) + b per row: the RMSNorm's
  division after the product that follows it, which it commutes with.

Both run the `tma` decode GEMM where it can run (CUDA, at most its row limit, bf16/fp16, addressable tensors) and
the same arithmetic in torch elsewhere, so a step that falls off the kernel is slower, never wrong. Registered on
first use, never inside a compiled region; opaque to `torch.compile` and capturable in CUDA graphs.
"""

from __future__ import annotations

from typing import Any

_OPS: dict[str, Any] = {}
STRIP = 64  # columns per sum-of-squares strip in the torch fallback (the kernel's BLOCK_N)


def numerator(h: Any, gamma: Any) -> tuple[Any, Any]:
    """(g, sq) of an RMSNorm's input `h` computed in torch (a layer whose input no epilogue prepared): one strip."""
    import torch

    hf = h.to(torch.float32)
    return (hf * gamma.to(torch.float32)).to(h.dtype), hf.square().sum(-1).reshape(1, -1)


def _strip_sums(h: Any) -> Any:
    import torch
    import torch.nn.functional as F

    hf = h.reshape(-1, h.shape[-1]).to(torch.float32)
    n = hf.shape[-1]
    strips = -(-n // STRIP)
    return F.pad(hf, (0, strips * STRIP - n)).square().view(hf.shape[0], strips, STRIP).sum(-1).T.contiguous()


def _tma(x: Any, weight: Any, *others: Any) -> Any:
    """The `tma` kernel module where it can compute these operands, else None."""
    if not x.is_cuda or any(t is not None and not t.is_contiguous() for t in others):
        return None
    from . import decode_gemm_tma as tma

    return tma if tma.unsupported(x, weight) is None else None


def ops() -> dict[str, Any]:
    """The registered ops: `residual_linear` and `scaled_linear` (callable as torch ops)."""
    if _OPS:
        return _OPS
    import torch
    import torch.nn.functional as F

    @torch.library.custom_op("asyncbatch::residual_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias, Tensor residual, Tensor? gamma, "
                                    "bool pdl) -> (Tensor, Tensor, Tensor)")
    def residual_linear(x, weight, bias, residual, gamma, pdl):  # noqa: ANN001, ANN202
        tma = _tma(x, weight, residual)
        if tma is not None:
            return tma.matmul_residual(x, weight, bias, residual, gamma, pdl=pdl)
        h = residual + F.linear(x, weight, bias)
        n = weight.shape[0]
        if gamma is None:
            return h, h.new_empty(0, n), h.new_empty(0, h.numel() // n, dtype=torch.float32)
        g = (h.to(torch.float32) * gamma.to(torch.float32)).to(h.dtype)
        return h, g, _strip_sums(h)

    @residual_linear.register_fake
    def _(x, weight, bias, residual, gamma, pdl):  # noqa: ANN001, ANN202
        n = weight.shape[0]
        rows = x.numel() // x.shape[-1]
        h = x.new_empty(*x.shape[:-1], n)
        if gamma is None:
            return h, x.new_empty(0, n), x.new_empty(0, rows, dtype=torch.float32)
        return h, x.new_empty(*x.shape[:-1], n), x.new_empty(-(-n // STRIP), rows, dtype=torch.float32)

    @torch.library.custom_op("asyncbatch::scaled_linear", mutates_args=(),
                             schema="(Tensor g, Tensor sq, Tensor weight, Tensor? bias, float eps, bool pdl) -> Tensor")
    def scaled_linear(g, sq, weight, bias, eps, pdl):  # noqa: ANN001, ANN202
        tma = _tma(g, weight, sq)
        if tma is not None:
            return tma.matmul_row_scaled(g, sq, weight, bias, eps, pdl=pdl)
        k = g.shape[-1]
        scale = torch.rsqrt(sq.sum(0) / k + eps).reshape(*g.shape[:-1], 1)
        out = F.linear(g, weight).to(torch.float32) * scale
        if bias is not None:
            out = out + bias.to(torch.float32)
        return out.to(g.dtype)

    @scaled_linear.register_fake
    def _(g, sq, weight, bias, eps, pdl):  # noqa: ANN001, ANN202
        return g.new_empty(*g.shape[:-1], weight.shape[0])

    _OPS.update(residual_linear=residual_linear, scaled_linear=scaled_linear)
    return _OPS
