"""The default GPU engine on the Llama, Qwen2, Qwen3 and Mistral families at their released widths, in bf16: every
fused path on (q/k/v and gate/up fusion, the tma decode GEMM, folded norms, rotary inside attention, compiled and
captured steps), its greedy tokens judged against a float32 forward of the same model.

Widths, head counts and head sizes are those of released checkpoints (Llama-3.2-1B with tied embeddings and llama3
RoPE scaling, Qwen2.5-0.5B with 14 query heads over 2 KV heads and per-layer windows, Qwen2.5-7B's biased q/k/v
at 28 heads, Qwen3-0.6B whose head size is not hidden / heads, Mistral-7B with a window inside and outside the
prompts), with 2-4 layers and random weights. bf16 tokens cannot equal float32 tokens, so each token the engine
chose is scored by the float32 model, teacher-forced over the engine's own sequence: its gap to the best logit,
in standard deviations of that position's logits. transformers' own bf16 forward, scored the same way, agreed
with the float32 argmax at 95-98% of the positions, with gaps up to 0.056 (H200, 2026-11-29); the engine matched
that on every shape. A kernel that drops a bias, a window or a head mixes tokens at gaps of order 1.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
           num_hidden_layers=2)
SHAPES = {
    "llama-3.2-1b": ("tiny-llama", dict(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        num_hidden_layers=4, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_theta": 500000.0})),
    "qwen2.5-0.5b-windows": ("tiny-qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
        num_hidden_layers=4, tie_word_embeddings=True, use_sliding_window=True, sliding_window=128,
        max_window_layers=2)),
    "qwen2.5-7b": ("tiny-qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
        num_hidden_layers=2, rope_theta=1000000.0)),
    "qwen3-0.6b": ("tiny-qwen3", dict(
        hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        num_hidden_layers=4, tie_word_embeddings=True, rope_theta=1000000.0)),
    "mistral-7b-window-128": ("tiny-mistral", dict(_8B, sliding_window=128)),
    "mistral-7b-long-prompts": ("tiny-mistral", dict(_8B, sliding_window=4096, max_position_embeddings=32768)),
}
ENGINE = {"runtime": "cuda", "buffers": "double", "streams": "three", "graphs": "mixed", "attention": "auto",
          "batch": {"max_tokens": 512, "max_seqs": 32}}


def _prompts(name: str) -> tuple[list[list[int]], int]:
    """Prompts of every kind of length (one token, around a 16-token block, past a window, chunked prefill), and
    the cache blocks they need."""
    rng = random.Random(7)
    if name.endswith("long-prompts"):
        lengths, blocks = [12000, 8191, 5000, 4097, 1] + [rng.randint(2, 400) for _ in range(7)], 4096
    else:
        lengths, blocks = [1, 3, 17, 64, 127, 129, 200, 300, 450, 600] + [rng.randint(2, 400) for _ in range(10)], 2048
    return [[rng.randrange(32000) for _ in range(n)] for n in lengths], blocks


def _gaps(model, prompts, outputs) -> torch.Tensor:
    """Per generated token: (best logit - logit of the chosen token) / std of the logits, under float32."""
    ref = copy.deepcopy(model).float()
    ref.set_attn_implementation("sdpa")
    gaps = []
    with torch.no_grad():
        for prompt, out in zip(prompts, outputs):
            logits = ref(torch.tensor([prompt + out], device="cuda"), logits_to_keep=len(out) + 1).logits[0, :-1]
            chosen = logits.gather(-1, torch.tensor(out, device="cuda")[:, None])[:, 0]
            gaps.append((logits.max(-1).values - chosen) / logits.std(-1))
    del ref
    return torch.cat(gaps)


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_default_engine_decodes_each_family_within_bf16_of_float32(name):
    preset, overrides = SHAPES[name]
    model, _ = build_model(ModelConfig(preset=preset, dtype="bfloat16", device="cuda",
                                       overrides={"vocab_size": 32000, "max_position_embeddings": 8192, **overrides}),
                           get_plugin_host())
    prompts, blocks = _prompts(name)
    engine = Engine.from_model(model, EngineConfig.from_dict({**ENGINE, "cache": {"num_blocks": blocks}}))
    outputs = [list(o.token_ids) for o in engine.generate(prompts, SamplingParams(max_new_tokens=24,
                                                                                  ignore_eos=True))]
    layer = model.model.layers[0]  # the engine's state stays bound until release
    paths = {"folded": "forward" in layer.__dict__, "rotary": "_asyncbatch_rotary" in layer.self_attn.__dict__,
             "decode gemm": type(layer.mlp.down_proj.inner).__name__ == "DecodeLinear"}
    engine.release()

    gaps = _gaps(model, prompts, outputs)

    assert {"folded": True, "rotary": True, "decode gemm": True} == paths
    assert [24] * len(prompts) == [len(o) for o in outputs]
    assert (gaps == 0).float().mean().item() >= 0.9, f"{(gaps == 0).float().mean().item():.3f} at the argmax"
    assert gaps.max().item() <= 0.2, f"a token {gaps.max().item():.3f} standard deviations below the best"
