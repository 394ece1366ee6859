"""Folded RMSNorms (`engine.fold_norms`) on a Hopper GPU: the `tma` epilogues at the 8B shapes in bf16, logits within
bf16 rounding of the unfolded layers, and engine tokens that do not depend on whether the layers were folded."""

from __future__ import annotations

import random

import pytest
import torch

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.decode_gemm import set_decode_gemm
from asyncbatch.core.fusion import set_fused
from asyncbatch.core.models import build_model
from asyncbatch.core.norm_fold import set_norm_fold
from asyncbatch.core.plugin_host import get_plugin_host

hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not hopper, reason="needs a Hopper (or newer) CUDA device")]


@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 14336), (6144, 4096), (28672, 4096)])
@pytest.mark.parametrize("m", [1, 7, 32])
def test_the_epilogues_at_the_8b_shapes_in_bf16(n, k, m):
    from asyncbatch.core import decode_gemm_tma as tma

    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).bfloat16()
    residual = (3 * torch.randn(m, n, device="cuda", generator=gen)).bfloat16()
    gamma = (torch.rand(n, device="cuda", generator=gen) + 0.5).bfloat16()

    h, g, sq = tma.matmul_residual(x, w, None, residual, gamma)

    assert torch.equal(residual + tma.matmul(x, w), h)
    assert torch.equal((h.float() * gamma.float()).bfloat16(), g)
    torch.testing.assert_close(sq.sum(0), h.float().square().sum(-1), rtol=1e-5, atol=1e-3)
    w2 = (torch.randn(1024, n, device="cuda", generator=gen) / n ** 0.5).bfloat16()
    hf = h.float()
    normed = gamma * (hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + 1e-5)).bfloat16()
    exact = normed.double() @ w2.double().T
    actual = tma.matmul_row_scaled(g, sq, w2, None, 1e-5)
    assert ((actual.double() - exact).norm() / exact.norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_folded_logits_agree_with_the_unfolded_layers_in_half_precision(dtype):
    model, _ = build_model(ModelConfig(preset="small", dtype=dtype, device="cuda"), get_plugin_host())
    shapes = [(1, 1), (1, 7), (4, 8), (2, 16)]  # at most 32 rows: the folded path (more run the layer's own)
    inputs = [torch.randint(0, model.config.vocab_size, shape, device="cuda") for shape in shapes]
    with torch.no_grad():
        set_fused(model, True)
        set_decode_gemm(model, "tma")
        plain = [model(ids).logits.float() for ids in inputs]
        assert len(model.model.layers) == set_norm_fold(model, True)
        folded = [model(ids).logits.float() for ids in inputs]
        set_norm_fold(model, False)
        again = [model(ids).logits.float() for ids in inputs]
    worst = max(((f - p).abs().max() / p.abs().max()).item() for f, p in zip(folded, plain))
    agree = torch.cat([(f.argmax(-1) == p.argmax(-1)).flatten() for f, p in zip(folded, plain)]).float().mean()

    assert all(torch.equal(p, a) for p, a in zip(plain, again))  # unfolding gives the very same model back
    assert worst <= 0.02, f"largest logit difference {worst:.4f} of the largest logit"  # a few ulp of bf16
    assert agree.item() >= 0.95, f"argmax agreement {agree.item():.3f} over {agree.numel()} positions"


def test_the_default_engine_folds_on_this_card_and_keeps_its_tokens_in_float32():
    """bf16 is needed for the kernel; in float32 the folded layers run the same arithmetic in torch, so the tokens
    must be the unfolded ones (the engine's `auto` folds wherever the tma decode GEMM runs)."""
    model, _ = build_model(ModelConfig(preset="small", dtype="float32", device="cuda"), get_plugin_host())
    rng = random.Random(0)
    prompts = [[rng.randrange(32000) for _ in range(rng.randint(5, 120))] for _ in range(16)]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    tokens = {}
    for fold in ("never", "always"):
        cfg = EngineConfig.from_dict({"runtime": "cuda", "decode_gemm": "tma", "fold_norms": fold,
                                      "batch": {"max_tokens": 512, "max_seqs": 16},
                                      "cache": {"num_blocks": 512, "block_size": 16}})
        engine = Engine.from_model(model, cfg)
        tokens[fold] = [o.token_ids for o in engine.generate(prompts, params)]
        assert fold == engine.model_state.fold_norms
        engine.release()

    assert tokens["never"] == tokens["always"]
