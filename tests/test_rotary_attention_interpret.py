"""The `triton` backend rotating q and k itself (`engine.fuse_rotary`), under Triton's interpreter on a CPU: given
the step's cos and sin rows and q/k as the projections leave them, it returns what transformers' rotation followed
by the plain backend returns, and leaves the same rotated keys in the cache, in decode steps (with and without the
fused cache write), mixed steps and the batch-invariant path; a rotation the kernels cannot do (partial width) is
done in torch first."""

from __future__ import annotations

import pytest
import torch
from interpreted import import_triton_interpreted, interpreted_attention_kernels

import_triton_interpreted()

from test_attention_triton_interpret import DECODE, MIXED, make_step  # noqa: E402

from asyncbatch.core.attention_api import apply_rotary  # noqa: E402
from asyncbatch.strategies.attention.triton_paged import TritonPaged, TritonPagedConfig  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    with interpreted_attention_kernels() as module:
        yield module


def _rotary_rows(gen, tokens: int, width: int):
    """cos and sin rows as a RoPE module gives them: angle = position * frequency, halves repeated."""
    positions = torch.randint(0, 500, (tokens, 1), generator=gen).float()
    freqs = 10000.0 ** (-torch.arange(0, width, 2).float() / width)
    angles = torch.cat([positions * freqs] * 2, dim=-1)
    return angles.cos(), angles.sin()


def _backend(splits: int, fuse_write: str, invariant: bool) -> TritonPaged:
    backend = TritonPaged(TritonPagedConfig(num_splits=splits, block_n=16, fuse_cache_write=fuse_write))
    if invariant:
        backend.make_batch_invariant()
    return backend


@pytest.mark.parametrize("seqs,splits,fuse_write,invariant,width", [
    (DECODE, 1, "never", False, 32), (DECODE, 3, "always", False, 32), (DECODE, 2, "never", False, 32),
    (MIXED, 0, "auto", False, 32), (MIXED, 0, "auto", True, 32), (DECODE, 3, "always", False, 16)])
def test_the_backend_rotates_as_transformers_would(seqs, splits, fuse_write, invariant, width):
    gen = torch.Generator().manual_seed(splits * 5 + width + invariant)
    (q, k, v, k_cache, v_cache), meta, _ = make_step(gen, seqs, pad_tokens=2, pad_seqs=1, block_size=16,
                                                     q_heads=8, kv_heads=2, head_dim=32)
    cos, sin = _rotary_rows(gen, q.shape[0], width)
    scale = q.shape[-1] ** -0.5
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    assert not torch.equal(q_rot, q)
    expected = _backend(splits, fuse_write, invariant).forward(q_rot, k_rot, v, kc_ref, vc_ref, meta, scale=scale,
                                                               sliding_window=None)

    actual = _backend(splits, fuse_write, invariant).forward(q, k, v, k_cache, v_cache, meta, scale=scale,
                                                             sliding_window=None, rotary=(cos, sin))

    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(k_cache[1:], kc_ref[1:], rtol=0, atol=1e-6)  # block 0: the padding tokens' slot
    assert torch.equal(v_cache[1:], vc_ref[1:])


def test_the_rotation_is_transformers_own():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(5, 4, 32, generator=gen), torch.randn(5, 2, 32, generator=gen)
    cos, sin = _rotary_rows(gen, 5, 32)
    # transformers takes [batch, heads, tokens, D] and cos [batch, tokens, D]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])

    ours_q, ours_k = apply_rotary(q, k, cos, sin)

    torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1), rtol=0, atol=1e-6)
