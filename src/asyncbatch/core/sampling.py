"""Token sampling on the device, inside the (possibly captured) compute step.

Noise is counter-based: the uniform draw for token i of a request at vocabulary index v is a hash of
(seed, i, v). A request's samples therefore depend only on its seed and its logits, never on which other requests
share the batch, the slot, or the engine combination.
"""

from __future__ import annotations

import functools

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # Values stay in [0, 2^32) inside int64; the multiplier keeps products below 2^63.
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seed_lo: torch.Tensor, seed_hi: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float32 in (0, 1), a pure function of (seed, index, vocabulary position)."""
    lo = seed_lo.long() & _M32
    hi = seed_hi.long() & _M32
    base = _mix32(_mix32(lo ^ 0x9E3779B9) ^ hi)
    base = _mix32(base ^ ((index.long() * 0x27D4EB2D) & _M32))
    v = torch.arange(vocab, device=base.device, dtype=torch.long)
    h = _mix32(base[:, None] ^ ((v[None, :] * 0x165667B1) & _M32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24)) + (0.5 / (1 << 24))


def _filter(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (top-p) to -inf. k=0 and p=1 disable them."""
    vocab = x.shape[-1]
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k.long(), torch.full_like(top_k, vocab, dtype=torch.long))
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
    drop = drop | ((before > top_p[:, None]) & (top_p[:, None] < 1.0))
    drop[:, 0] = False  # the most likely token always survives
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)


@functools.cache
def _argmax_kernels():  # noqa: ANN202
    try:
        from . import argmax_kernels
    except ImportError:  # a CUDA build without triton: torch's reduction
        return None
    return argmax_kernels


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """int32 [B]: `x.argmax(dim=-1)` of a [B, V] tensor. On CUDA a chunked Triton kernel (see `argmax_kernels`:
    torch's reduction leaves most of the GPU idle at decode batch sizes); the same indices either way."""
    kernels = _argmax_kernels() if x.is_cuda else None
    if kernels is not None:
        return kernels.row_argmax(x)
    return x.argmax(dim=-1).to(torch.int32)


def sample(logits: torch.Tensor, mode: str, v) -> torch.Tensor:
    """int32 [B]: one token per row of `logits` [B, V]. `v` holds the per-sequence parameter views of the slot."""
    greedy = argmax_rows(logits)
    if mode == "greedy":
        return greedy
    temperature = v.temperature.view(torch.float32)
    is_greedy = temperature <= 0
    x = logits.float() / torch.where(is_greedy, torch.ones_like(temperature), temperature)[:, None]
    if mode == "filter":
        x = _filter(x, v.top_k, v.top_p.view(torch.float32))
    u = uniform_noise(v.seed_lo, v.seed_hi, v.sample_index, x.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    sampled = argmax_rows(x + gumbel)
    return torch.where(is_greedy, greedy, sampled)
