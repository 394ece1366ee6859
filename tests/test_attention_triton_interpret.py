"""The Triton backend against the Sdpa reference on CPU, with Triton's interpreter (float32, small problems).

TRITON_INTERPRET is set only while this module's tests run and the kernel module is loaded afresh under it, so a
GPU test in the same pytest process still gets compiled kernels.

The file name sorts before every test that imports triton without the interpreter (torch.compile's inductor
does): the interpreter must be chosen when triton is first imported, which happens when this module is collected.
"""

from __future__ import annotations

import sys

import attrs
import pytest
import torch
from interpreted import import_triton_interpreted, interpreted_attention_kernels

import_triton_interpreted()

from asyncbatch.core.attention_api import AttentionMetadata  # noqa: E402
from asyncbatch.core.errors import UnsupportedError  # noqa: E402
from asyncbatch.strategies.attention.sdpa import Sdpa  # noqa: E402
from asyncbatch.strategies.attention.triton_paged import TritonPaged, TritonPagedConfig  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    with interpreted_attention_kernels() as module:
        yield module


def make_step(gen, seqs, *, pad_tokens, pad_seqs, block_size, kv_heads, q_heads, head_dim, num_blocks=64):
    """`seqs`: (context before this step, query tokens) per real sequence. Returns tensors, meta, kv_blocks."""
    used = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 is the trash block
    num_seqs = len(seqs) + pad_seqs
    need = [-(-(c + n) // block_size) for c, n in seqs]
    max_blocks = max(need) + 2
    table = torch.zeros(num_seqs, max_blocks, dtype=torch.int32)
    positions, slots, token_seq, seq_len, cu = [], [], [], [], [0]
    taken = 0
    for s, ((ctx, n), nb) in enumerate(zip(seqs, need, strict=True)):
        table[s, :nb] = used[taken : taken + nb].to(torch.int32)
        taken += nb
        for p in range(ctx, ctx + n):
            positions.append(p)
            slots.append(int(table[s, p // block_size]) * block_size + p % block_size)
            token_seq.append(s)
        seq_len.append(ctx + n)
        cu.append(cu[-1] + n)
    assert taken < num_blocks
    positions += [0] * pad_tokens
    slots += [0] * pad_tokens
    token_seq += [-1] * pad_tokens
    seq_len += [0] * pad_seqs
    cu += [cu[-1]] * pad_seqs
    num_tokens = len(positions)
    i32 = torch.int32
    max_query = 1 << (max(n for _, n in seqs) - 1).bit_length()
    meta = AttentionMetadata(
        positions=torch.tensor(positions, dtype=i32), slot_mapping=torch.tensor(slots, dtype=torch.int64),
        token_seq=torch.tensor(token_seq, dtype=i32), seq_len=torch.tensor(seq_len, dtype=i32),
        query_start=torch.tensor(cu, dtype=i32), block_table=table, max_query=max_query, kv_blocks=0,
        block_size=block_size)
    # q, k, v as the transposed views the model hands over (non-contiguous)
    q = torch.randn(q_heads, num_tokens, head_dim, generator=gen).transpose(0, 1)
    k = torch.randn(kv_heads, num_tokens, head_dim, generator=gen).transpose(0, 1)
    v = torch.randn(kv_heads, num_tokens, head_dim, generator=gen).transpose(0, 1)
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen)
    v_cache = torch.randn(cache_shape, generator=gen)
    return (q, k, v, k_cache, v_cache), meta, max(need)


def run_both(inputs, meta, kv_blocks, *, window, splits=0, block_n=16, invariant=False, fuse_cache_write="always"):
    q, k, v, k_cache, v_cache = inputs
    scale = q.shape[-1] ** -0.5
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    ref_meta = attrs.evolve(meta, kv_blocks=kv_blocks)  # Sdpa gathers this many blocks per sequence
    ref = Sdpa().forward(q, k, v, kc_ref, vc_ref, ref_meta, scale=scale, sliding_window=window)
    backend = TritonPaged(TritonPagedConfig(num_splits=splits, block_n=block_n, fuse_cache_write=fuse_cache_write))
    if invariant:
        backend.make_batch_invariant()
    out = backend.forward(q, k, v, k_cache, v_cache, meta, scale=scale, sliding_window=window)
    assert out.shape == ref.shape and out.dtype == q.dtype
    # block 0 is the trash block padding tokens write to (or, in decode steps with the fused write, not at all)
    assert torch.equal(k_cache[1:], kc_ref[1:]) and torch.equal(v_cache[1:], vc_ref[1:])
    pads = meta.token_seq < 0
    assert torch.all(out[pads] == 0)
    err = (out - ref).abs().max().item()
    assert err < 1e-4, err
    return out


# (context before, query tokens) per sequence; mixed steps include decodes and chunks with prior context
MIXED = [(0, 5), (17, 1), (40, 9), (3, 1), (31, 16), (10, 37)]  # 37 tokens span several query tiles
DECODE = [(0, 1), (15, 1), (33, 1), (70, 1), (8, 1)]


@pytest.mark.parametrize("block_size,heads,window", [
    (16, (8, 2), None), (32, (8, 2), None), (16, (8, 2), 7), (32, (4, 2), 7), (32, (4, 2), None),
    (16, (2, 2), None)])
def test_mixed_step(block_size, heads, window):
    gen = torch.Generator().manual_seed(block_size * 100 + heads[0] * 10 + (window or 0))
    inputs, meta, nb = make_step(gen, MIXED, pad_tokens=3, pad_seqs=2, block_size=block_size,
                                 q_heads=heads[0], kv_heads=heads[1], head_dim=32)
    run_both(inputs, meta, nb, window=window)


@pytest.mark.parametrize("seqs,pad_tokens,pad_seqs", [
    ([(0, 1)] * 3 + [(20, 30)], 2, 4),              # decodes first, one chunk whose tiles start mid-tile
    ([(5, 15), (0, 17), (9, 1), (2, 33)], 0, 0),    # no padding at all: the tile bound is tight
    ([(0, 64)], 64, 7),                              # one prefill, half the tokens and most sequences padded
])
def test_mixed_launch_from_padded_counts_only(seqs, pad_tokens, pad_seqs):
    """The mixed grid comes from padded tokens and sequences (the step's real longest query is not passed), so
    any mix with the same padded counts replays one captured graph; every real token still gets its attention."""
    gen = torch.Generator().manual_seed(len(seqs) * 31 + pad_tokens)
    inputs, meta, nb = make_step(gen, seqs, pad_tokens=pad_tokens, pad_seqs=pad_seqs, block_size=16,
                                 q_heads=8, kv_heads=2, head_dim=32)
    padded = attrs.evolve(meta, max_query=inputs[0].shape[0])  # what the pipeline passes for static launches
    out = run_both(inputs, padded, nb, window=None)
    expected = run_both([t.clone() for t in inputs], meta, nb, window=None)
    assert torch.equal(expected, out)


@pytest.mark.parametrize("block_size,splits,window", [(16, 1, None), (32, 0, None), (16, 0, 20), (32, 1, 20)])
def test_decode_step(block_size, splits, window):
    """splits=1 writes the output directly; 0 (auto) splits each context and combines the parts."""
    gen = torch.Generator().manual_seed(block_size + splits * 7 + (window or 0))
    inputs, meta, nb = make_step(gen, DECODE, pad_tokens=2, pad_seqs=2, block_size=block_size,
                                 q_heads=8, kv_heads=2, head_dim=32)
    run_both(inputs, meta, nb, window=window, splits=splits)


@pytest.mark.parametrize("splits,window,heads", [(1, None, (8, 2)), (3, None, (8, 2)), (2, 9, (4, 4)),
                                                 (4, None, (16, 1))])
def test_decode_kernel_writing_the_new_kv_itself_matches_the_separate_write(splits, window, heads):
    """The fused write stores each real token's K/V in its slot (the same cache bits as the write kernel) and folds
    them into the softmax from registers; the output agrees with the two-kernel path. Some splits own only the new
    position (contexts 16 and 33 with chunks of 16), some hold none of the context."""
    gen = torch.Generator().manual_seed(splits * 13 + (window or 0))
    seqs = [(0, 1), (15, 1), (16, 1), (32, 1), (70, 1)]
    inputs, meta, nb = make_step(gen, seqs, pad_tokens=2, pad_seqs=1, block_size=16, q_heads=heads[0],
                                 kv_heads=heads[1], head_dim=32)
    fused = run_both([t.clone() for t in inputs], meta, nb, window=window, splits=splits)
    separate = run_both([t.clone() for t in inputs], meta, nb, window=window, splits=splits, fuse_cache_write="never")
    assert torch.allclose(separate, fused, atol=1e-5, rtol=0)


@pytest.mark.parametrize("setting, splits, fused", [("auto", 1, False), ("auto", 2, True), ("auto", 0, True),
                                                    ("always", 1, True), ("never", 3, False)])
def test_auto_fuses_the_write_where_the_step_splits(monkeypatch, interpreted_kernels, setting, splits, fused):
    """One split: every program would carry the write in its tail, which measured slower at batch 256."""
    calls = []
    real = interpreted_kernels.write_cache
    monkeypatch.setattr(interpreted_kernels, "write_cache", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(splits)
    inputs, meta, nb = make_step(gen, DECODE, pad_tokens=1, pad_seqs=1, block_size=16, q_heads=8, kv_heads=2,
                                 head_dim=32)
    run_both(inputs, meta, nb, window=None, splits=splits, fuse_cache_write=setting)
    assert fused == (not calls)


@pytest.mark.parametrize("seed", range(3))
def test_random_tables(seed):
    """Random sequence mixes, block tables, head dims (one not a power of two), block and chunk sizes."""
    gen = torch.Generator().manual_seed(1000 + seed)
    n = int(torch.randint(1, 5, (1,), generator=gen))
    decode = seed == 0
    seqs = [(int(torch.randint(0, 60, (1,), generator=gen)), 1 if decode else int(torch.randint(1, 12, (1,),
            generator=gen))) for _ in range(n)]
    head_dim = (16, 40, 64)[seed]
    inputs, meta, nb = make_step(gen, seqs, pad_tokens=seed, pad_seqs=seed % 2, block_size=(16, 64, 128)[seed],
                                 q_heads=4, kv_heads=2, head_dim=head_dim)
    run_both(inputs, meta, nb, window=(None, 13, None)[seed], splits=2 if decode else 0,
             block_n=(16, 32, 64)[seed])


@pytest.mark.parametrize("pad_tokens,pad_seqs", [(4, 1), (0, 3), (2, 2)])
def test_decode_splits_combined_by_their_last_program_match_the_combine_kernel(monkeypatch, pad_tokens, pad_seqs):
    """More padding tokens than sequences, or fewer: padding rows are zeros either way. Fresh buffers are filled
    with NaN, so a row nobody writes shows. Two calls in a row: the split counters are back at zero after each."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    gen = torch.Generator().manual_seed(pad_tokens * 10 + pad_seqs)
    inputs, meta, nb = make_step(gen, DECODE, pad_tokens=pad_tokens, pad_seqs=pad_seqs, block_size=16,
                                 q_heads=8, kv_heads=2, head_dim=32)
    q, k, v, k_cache, v_cache = inputs
    scale = q.shape[-1] ** -0.5
    ref = Sdpa().forward(q, k, v, k_cache.clone(), v_cache.clone(), attrs.evolve(meta, kv_blocks=nb), scale=scale,
                         sliding_window=None)
    pads = meta.token_seq < 0
    outs = {}
    monkeypatch.setattr(torch, "empty", poisoned)
    fused = TritonPaged(TritonPagedConfig(num_splits=3, block_n=16))
    for backend in (fused, TritonPaged(TritonPagedConfig(num_splits=3, block_n=16, fuse_combine=False)), fused):
        out = backend.forward(q, k, v, k_cache, v_cache, meta, scale=scale, sliding_window=None)
        assert torch.all(out[pads] == 0)
        assert (out - ref).abs().max().item() < 1e-4
        outs.setdefault(backend.config.fuse_combine, out)
        assert all(int(buf.abs().sum()) == 0 for buf in backend.split_counters.get(q.device, []))
    assert fused.split_counters[q.device]  # the fused path ran
    assert torch.allclose(outs[True], outs[False], atol=1e-6, rtol=0)


def test_check_refuses_cpu_and_missing_triton(monkeypatch):
    backend = TritonPaged()
    with pytest.raises(UnsupportedError, match="CUDA"):
        backend.check(torch.device("cpu"), torch.float32, 64, 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # reach the triton check on a CPU machine
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    with pytest.raises(UnsupportedError, match="triton is not importable"):
        backend.check(torch.device("cuda"), torch.bfloat16, 128, 16)


@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("heads,window", [((8, 2), None), ((8, 2), 7), ((4, 4), None), ((16, 1), 20)])
def test_batch_invariant_mode_is_correct_in_decode_and_mixed_steps(seqs, heads, window):
    """Invariant mode runs every step through the query-tiled kernel with 16-row tiles and no split; the result is
    still attention (bitwise identity across batches is asserted on the GPU)."""
    gen = torch.Generator().manual_seed(heads[0] * 7 + (window or 0))
    inputs, meta, nb = make_step(gen, seqs, pad_tokens=2, pad_seqs=1, block_size=16, q_heads=heads[0],
                                 kv_heads=heads[1], head_dim=32)
    run_both(inputs, meta, nb, window=window, invariant=True)


def test_only_the_triton_backend_has_an_invariant_mode():
    with pytest.raises(UnsupportedError, match="Sdpa has no batch-invariant mode"):
        Sdpa().make_batch_invariant()


@pytest.mark.parametrize("card, waves, expected", [
    ("NVIDIA H100 80GB HBM3", 0, 3),  # 4 waves of 132 SMs over 32 sequences x 8 kv heads
    ("NVIDIA H200", 0, 2),  # measured best there: 2 waves
    ("NVIDIA H200", 4, 3),  # an explicit value wins
    ("NVIDIA A100-SXM4-80GB", 0, 3),  # not measured: the default
])
def test_decode_splits_follow_the_waves_measured_on_the_card(monkeypatch, card, waves, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: card)
    backend = TritonPaged(TritonPagedConfig(waves=waves))
    cuda = torch.device("cuda", 0)
    backend._sm_count[cuda] = 132
    assert expected == backend.num_splits(cuda, num_seqs=32, kv_heads=8, max_blocks=64, block_size=16)
