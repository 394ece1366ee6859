"""The rotary embedding applied by the `triton` attention kernels (`engine.fuse_rotary`) on a CUDA device: at the 8B
shapes in bf16 the backend given unrotated q/k and the cos/sin rows agrees with transformers' rotation followed by
the plain backend (decode with the fused and the separate cache write, mixed steps), and an engine's tokens do not
depend on where the rotation runs."""

from __future__ import annotations

import random

import pytest
import torch

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.attention_api import AttentionMetadata, apply_rotary
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host
from asyncbatch.strategies.attention.triton_paged import TritonPaged, TritonPagedConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _step(seqs, *, block_size=16, kv_heads=8, q_heads=32, head_dim=128, seed=0):
    """A packed step on the GPU: `seqs` = (context before, new tokens) per sequence; each sequence's blocks are
    consecutive from block 1 on (block 0 is the padding slot)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    max_blocks = max(-(-(c + n) // block_size) for c, n in seqs) + 1
    table = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    positions, slots, token_seq, seq_len, starts = [], [], [], [], [0]
    nxt = 1
    for s, (ctx, n) in enumerate(seqs):
        need = -(-(ctx + n) // block_size)
        table[s, :need] = torch.arange(nxt, nxt + need, dtype=torch.int32)
        nxt += need
        for p in range(ctx, ctx + n):
            positions.append(p)
            slots.append(int(table[s, p // block_size]) * block_size + p % block_size)
            token_seq.append(s)
        seq_len.append(ctx + n)
        starts.append(starts[-1] + n)
    i32 = torch.int32
    meta = AttentionMetadata(
        positions=torch.tensor(positions, dtype=i32, device="cuda"),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device="cuda"),
        token_seq=torch.tensor(token_seq, dtype=i32, device="cuda"),
        seq_len=torch.tensor(seq_len, dtype=i32, device="cuda"),
        query_start=torch.tensor(starts, dtype=i32, device="cuda"), block_table=table.cuda(),
        max_query=1 << (max(n for _, n in seqs) - 1).bit_length(), kv_blocks=0, block_size=block_size)
    tokens = len(positions)
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, device="cuda", generator=gen).bfloat16()
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)  # strided views
    q, k, v = q.view(tokens, q_heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    cache = (nxt + 1, block_size, kv_heads, head_dim)
    k_cache = torch.randn(cache, device="cuda", generator=gen).bfloat16()
    v_cache = torch.randn(cache, device="cuda", generator=gen).bfloat16()
    freqs = 500000.0 ** (-torch.arange(0, head_dim, 2, device="cuda").float() / head_dim)
    angles = torch.cat([meta.positions.float()[:, None] * freqs] * 2, dim=-1)
    return (q, k, v, k_cache, v_cache), meta, (angles.cos().bfloat16(), angles.sin().bfloat16())


@pytest.mark.parametrize("seqs, fuse_write", [
    ([(127 + 13 * i, 1) for i in range(32)], "always"), ([(127 + 13 * i, 1) for i in range(32)], "never"),
    ([(4000, 1)], "auto"), ([(0, 300), (50, 1), (700, 40), (9, 1)], "auto")])
def test_the_kernels_rotate_as_transformers_does_at_the_8b_shapes(seqs, fuse_write):
    (q, k, v, k_cache, v_cache), meta, rotary = _step(seqs, seed=len(seqs))
    scale = q.shape[-1] ** -0.5
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    backend = TritonPaged(TritonPagedConfig(fuse_cache_write=fuse_write))
    q_rot, k_rot = apply_rotary(q, k, *rotary)
    expected = backend.forward(q_rot, k_rot, v, kc_ref, vc_ref, meta, scale=scale, sliding_window=None)

    actual = backend.forward(q, k, v, k_cache, v_cache, meta, scale=scale, sliding_window=None, rotary=rotary)

    same_keys = (k_cache[1:] == kc_ref[1:]).float().mean().item()
    assert same_keys >= 0.999, f"{same_keys:.5f} of the cached keys bit-identical"  # fma against two roundings
    torch.testing.assert_close(k_cache[1:].float(), kc_ref[1:].float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(v_cache[1:], vc_ref[1:])
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_engines_tokens_do_not_depend_on_where_the_rotation_runs(dtype):
    model, _ = build_model(ModelConfig(preset="small", dtype=dtype, device="cuda"), get_plugin_host())
    rng = random.Random(1)
    prompts = [[rng.randrange(32000) for _ in range(rng.randint(5, 120))] for _ in range(16)]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    tokens = {}
    for fuse in ("never", "always"):
        cfg = EngineConfig.from_dict({"runtime": "cuda", "attention": "triton", "fuse_rotary": fuse,
                                      "batch": {"max_tokens": 512, "max_seqs": 16},
                                      "cache": {"num_blocks": 512, "block_size": 16}})
        engine = Engine.from_model(model, cfg)
        tokens[fuse] = [o.token_ids for o in engine.generate(prompts, params)]
        assert fuse == engine.model_state.fuse_rotary
        engine.release()
    same = sum(a == b for a, b in zip(tokens["never"], tokens["always"]))

    if dtype == "float32":
        assert tokens["never"] == tokens["always"]
    else:  # both round the float32 rotation once; an fma may still move a bf16 key by one ulp
        assert same >= 14, f"{same} of 16 requests kept their tokens"
