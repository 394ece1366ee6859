"""Fused projections on a GPU: logits within bf16 rounding of the unfused model, and (float32) the same greedy
tokens from the default engine with and without fusion."""

from __future__ import annotations

import random

import pytest
import torch

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.fusion import set_fused
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _model(dtype: str):
    model, _ = build_model(ModelConfig(preset="small", dtype=dtype, device="cuda"), get_plugin_host())
    return model


@pytest.mark.parametrize("batch", [1, 32])
def test_fused_logits_agree_with_the_unfused_model_in_bf16(batch):
    model = _model("bfloat16")
    ids = torch.randint(0, model.config.vocab_size, (batch, 64), device="cuda", generator=None)
    with torch.no_grad():
        plain = model(ids).logits.float()
        assert 0 < set_fused(model, True)
        fused = model(ids).logits.float()
    scale = plain.abs().max().item()

    assert (fused - plain).abs().max().item() <= 0.02 * scale  # bf16: a few units in the last place
    assert 0.99 < (fused.argmax(-1) == plain.argmax(-1)).float().mean().item()


def test_the_default_engine_gives_the_same_greedy_tokens_fused_or_not():
    model = _model("float32")
    rng = random.Random(0)
    prompts = [[rng.randrange(32000) for _ in range(rng.randint(5, 120))] for _ in range(16)]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    tokens = {}
    for fuse in ("never", "always"):
        cfg = EngineConfig.from_dict({"runtime": "cuda", "fuse_projections": fuse,
                                      "batch": {"max_tokens": 512, "max_seqs": 16},
                                      "cache": {"num_blocks": 512, "block_size": 16}})
        engine = Engine.from_model(model, cfg)
        tokens[fuse] = [o.token_ids for o in engine.generate(prompts, params)]
        assert (fuse == "always") == engine.fused

    matching = sum(a == b for a, b in zip(tokens["never"], tokens["always"]))
    assert len(prompts) == matching
