"""Batch-invariant mode on a GPU, in bfloat16: the kernels give a row the same bits whatever shares its launch, and
a request (the needle) gets the same tokens alone, inside three different batch mixes, and under every buffer x
stream x graph combination."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.attention_api import AttentionMetadata
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BUFFERS = ["single", "double", {"name": "n_slot", "num_slots": 3}]
STREAMS = ["one", "two", "three"]
GRAPHS = ["eager", "per_slot", "staged", "mixed"]


@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (1000, 1536), (32000, 512)])
def test_a_gemm_row_has_the_same_bits_in_every_batch(n, k):
    from asyncbatch.core import invariant_kernels as kernels

    gen = torch.Generator(device="cuda").manual_seed(n)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    x = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    full = kernels.matmul(x, w, None, kernels.invariant_config(2048))
    for m in (1, 5, 32, 64, 65, 100, 333, 513, 1000):  # every tile of INVARIANT_TILES
        rows = torch.randperm(2048, generator=torch.Generator().manual_seed(m))[:m].cuda()
        assert torch.equal(full[rows], kernels.matmul(x[rows], w, None, kernels.invariant_config(m))), m
    ref = (x[:64].double() @ w.double().t())
    assert ((full[:64].double() - ref).abs().max() / ref.abs().max()).item() < 1e-2


def test_an_rms_norm_row_has_the_same_bits_in_every_batch():
    from asyncbatch.core import invariant_kernels as kernels

    x = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    full = kernels.rms_norm(x, w, 1e-5)
    for m in (1, 3, 64, 700):
        assert torch.equal(full[:m], kernels.rms_norm(x[:m].clone(), w, 1e-5))


def _decode_meta(ctx: list[int], block_size: int, max_blocks: int, q_lens: list[int]):
    """Sequences with `ctx` tokens before this step and `q_lens` new ones; block i of sequence s is block
    s * max_blocks + i + 1 (block 0 is the trash block)."""
    positions, slots, token_seq, qs = [], [], [], [0]
    for s, (c, n) in enumerate(zip(ctx, q_lens)):
        for p in range(c, c + n):
            positions.append(p)
            slots.append((s * max_blocks + p // block_size + 1) * block_size + p % block_size)
            token_seq.append(s)
        qs.append(qs[-1] + n)
    table = torch.tensor([[s * max_blocks + i + 1 for i in range(max_blocks)] for s in range(len(ctx))],
                         dtype=torch.int32)
    i32 = torch.int32
    return AttentionMetadata(
        positions=torch.tensor(positions, dtype=i32).cuda(), slot_mapping=torch.tensor(slots).cuda(),
        token_seq=torch.tensor(token_seq, dtype=i32).cuda(),
        seq_len=torch.tensor([c + n for c, n in zip(ctx, q_lens)], dtype=i32).cuda(),
        query_start=torch.tensor(qs, dtype=i32).cuda(), block_table=table.cuda(), max_query=max(q_lens),
        kv_blocks=max_blocks, block_size=block_size)


def test_an_attention_row_has_the_same_bits_decoding_alone_or_in_a_mixed_step():
    from asyncbatch.strategies.attention.triton_paged import TritonPaged

    bs, max_blocks, heads, kv, d = 16, 40, 32, 8, 128
    cache = torch.randn(8 * max_blocks + 1, bs, kv, d, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = cache, torch.randn_like(cache)
    backend = TritonPaged()
    backend.make_batch_invariant()
    gen = torch.Generator(device="cuda").manual_seed(0)
    needle = [torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for n in (heads, kv, kv)]
    outs = []
    # The needle is sequence 0: 500 tokens of context, one new token; then beside decodes and prefill chunks.
    for ctx, q_lens in (([500], [1]), ([500, 7, 300], [1, 1, 1]), ([500, 0, 260, 33], [1, 120, 1, 64])):
        meta = _decode_meta(ctx, bs, max_blocks, q_lens)
        t = int(meta.positions.shape[0])
        q, k, v = (torch.randn(t, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for n in (heads, kv, kv))
        q[0], k[0], v[0] = needle
        out = backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, scale=d**-0.5, sliding_window=None)
        outs.append(out[0].clone())
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], outs[2])


@pytest.fixture(scope="module")
def model():
    m, _ = build_model(ModelConfig(preset="small", dtype="bfloat16", device="cuda"), get_plugin_host())
    return m


NEEDLE = [random.Random(7).randrange(32000) for _ in range(300)]
NEEDLE_PARAMS = [SamplingParams(max_new_tokens=48, ignore_eos=True),
                 SamplingParams(max_new_tokens=48, ignore_eos=True, temperature=0.8, seed=11)]


def _mix(seed: int, n: int, lo: int, hi: int, new: tuple[int, int]):
    rng = random.Random(seed)
    prompts = [[rng.randrange(32000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    params = [SamplingParams(max_new_tokens=rng.randint(*new), ignore_eos=True,
                             temperature=rng.choice([0.0, 0.7]), seed=rng.randrange(1000)) for _ in prompts]
    return prompts, params


MIXES = {
    "decodes": _mix(1, 14, 5, 40, (20, 80)),          # short prompts: mostly decode steps beside the needle
    "prefills": _mix(2, 10, 200, 700, (4, 30)),       # long prompts: chunked prefill beside its decode
    "crowd": _mix(3, 30, 1, 300, (1, 60)),            # more requests than rows: preemption-free queueing
}


def _engine(model, buffers="double", streams="three", graphs="mixed", *, max_tokens=512, invariant=True):
    cfg = EngineConfig.from_dict({
        "runtime": "cuda", "buffers": buffers, "streams": streams, "graphs": graphs, "compile": "layers",
        "batch_invariant": invariant, "attention": "triton", "batch": {"max_tokens": max_tokens, "max_seqs": 16},
        "cache": {"num_blocks": 2048, "block_size": 16}, "startup": {"warmup": "never"}})
    return Engine.from_model(model, cfg)


def _needle_tokens(engine, mix=None):
    prompts, params = ([], []) if mix is None else MIXES[mix]
    outs = engine.generate([NEEDLE, NEEDLE, *prompts], [*NEEDLE_PARAMS, *params])
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def alone(model):
    return _needle_tokens(_engine(model))[:2]


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("max_tokens", [512, 128])
def test_the_needle_gets_the_same_tokens_in_every_mix(model, alone, mix, max_tokens):
    """`max_tokens` 128 chunks the needle's 300-token prompt at other boundaries than 512 does."""
    assert alone == _needle_tokens(_engine(model, max_tokens=max_tokens), mix)[:2]


@pytest.fixture(scope="module")
def crowd_reference(model):
    return _needle_tokens(_engine(model), "crowd")


@pytest.mark.parametrize("buffers,streams,graphs", list(itertools.product(BUFFERS, STREAMS, GRAPHS)),
                         ids=lambda v: v if isinstance(v, str) else "n_slot3")
def test_every_request_gets_the_same_tokens_in_every_pipeline(model, alone, crowd_reference, buffers, streams,
                                                              graphs):
    tokens = _needle_tokens(_engine(model, buffers, streams, graphs), "crowd")

    assert alone == tokens[:2]
    assert crowd_reference == tokens
