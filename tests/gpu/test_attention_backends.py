"""The fast attention backends against the Sdpa reference on CUDA, at the Llama-3-8B head shape.

The reference runs Sdpa on float64 copies of the same (already rounded) inputs, so the error measured is the
backend's own. Also checks that a step captured in a CUDA graph and replayed on new inputs equals eager.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from asyncbatch.core.attention_api import AttentionMetadata
from asyncbatch.core.errors import UnsupportedError
from asyncbatch.strategies.attention.flash import Flash
from asyncbatch.strategies.attention.sdpa import Sdpa
from asyncbatch.strategies.attention.triton_paged import TritonPaged

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-4}


def make_step(gen, seqs, *, dtype, pad_tokens=3, pad_seqs=2, max_blocks=160, num_blocks=8192):
    """`seqs`: (context before this step, query tokens) per real sequence -> (q, k, v, k_cache, v_cache), meta.

    Blocks are drawn at random from the whole cache, so tables are scattered as after many admissions."""
    dev = DEVICE
    bs = BLOCK_SIZE
    need = [-(-(c + n) // bs) for c, n in seqs]
    assert max(need) <= max_blocks and sum(need) < num_blocks
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).to(torch.int32)  # block 0 is the trash block
    num_seqs = len(seqs) + pad_seqs
    table = torch.zeros(num_seqs, max_blocks, dtype=torch.int32)
    positions, token_seq, seq_len, cu = [], [], [], [0]
    taken = 0
    for s, ((ctx, n), nb) in enumerate(zip(seqs, need, strict=True)):
        table[s, :nb] = perm[taken : taken + nb]
        taken += nb
        positions += range(ctx, ctx + n)
        token_seq += [s] * n
        seq_len.append(ctx + n)
        cu.append(cu[-1] + n)
    pos = torch.tensor(positions, dtype=torch.long)
    seq = torch.tensor(token_seq, dtype=torch.long)
    slots = table[seq, pos // bs].long() * bs + pos % bs
    num_real = len(positions)
    i32 = torch.int32
    meta = AttentionMetadata(
        positions=torch.cat([pos.to(i32), torch.zeros(pad_tokens, dtype=i32)]).to(dev),
        slot_mapping=torch.cat([slots, torch.zeros(pad_tokens, dtype=torch.long)]).to(dev),
        token_seq=torch.tensor(token_seq + [-1] * pad_tokens, dtype=i32, device=dev),
        seq_len=torch.tensor(seq_len + [0] * pad_seqs, dtype=i32, device=dev),
        query_start=torch.tensor(cu + [cu[-1]] * pad_seqs, dtype=i32, device=dev),
        block_table=table.to(dev), max_query=1 << (max(n for _, n in seqs) - 1).bit_length(),
        kv_blocks=max(need), block_size=bs)
    num_tokens = num_real + pad_tokens

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dev, dtype)

    # q, k, v as the transposed views the model hands over (non-contiguous)
    q = rand(Q_HEADS, num_tokens, HEAD_DIM).transpose(0, 1)
    k = rand(KV_HEADS, num_tokens, HEAD_DIM).transpose(0, 1)
    v = rand(KV_HEADS, num_tokens, HEAD_DIM).transpose(0, 1)
    caches = [rand(num_blocks, bs, KV_HEADS, HEAD_DIM) for _ in range(2)]
    return (q, k, v, *caches), meta


def decode_seqs(gen, n):
    return [(int(c), 1) for c in torch.randint(100, 2000, (n,), generator=gen)]


def mixed_seqs(gen):
    return decode_seqs(gen, 12) + [(0, 128), (700, 37), (1500, 64), (33, 5)]


def reference(inputs, meta, window):
    q, k, v, kc, vc = (x.double() for x in inputs)
    return Sdpa().forward(q, k, v, kc, vc, meta, scale=HEAD_DIM**-0.5, sliding_window=window)


def rel_err(out, ref, meta):
    real = meta.token_seq >= 0
    return ((out[real].double() - ref[real]).norm() / ref[real].norm()).item()


def run(backend, inputs, meta, window):
    q, k, v, kc, vc = (x.clone() for x in inputs)
    out = backend.forward(q, k, v, kc, vc, meta, scale=HEAD_DIM**-0.5, sliding_window=window)
    return out, kc, vc


def make_backend(name, dtype):
    backend = {"triton": TritonPaged, "flash": Flash}[name]()
    try:
        backend.check(torch.device("cuda"), dtype, HEAD_DIM, BLOCK_SIZE)
    except UnsupportedError as exc:
        pytest.skip(f"{name}: {exc}")
    return backend


@pytest.mark.parametrize("name", ["triton", "flash"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["decode", "decode_b1", "decode_b100", "mixed"])
@pytest.mark.parametrize("window", [None, 256])
def test_matches_reference(name, dtype, kind, window):
    backend = make_backend(name, dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}{window}".encode()))
    # 1 and 40 sequences take the split (flash-decoding) path, 100 the single-pass one (with 132 SMs)
    seqs = {"decode": decode_seqs(gen, 40), "decode_b1": decode_seqs(gen, 1), "decode_b100": decode_seqs(gen, 100),
            "mixed": mixed_seqs(gen)}[kind]
    inputs, meta = make_step(gen, seqs, dtype=dtype)
    ref = reference(inputs, meta, window)
    out, kc, vc = run(backend, inputs, meta, window)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    err = rel_err(out, ref, meta)
    assert err < TOLERANCE[dtype], f"{name} {kind} {dtype} window={window}: relative error {err:.2e}"
    # the new K/V went to their slots
    flat = kc.view(-1, KV_HEADS, HEAD_DIM)[meta.slot_mapping[meta.token_seq >= 0]]
    assert torch.equal(flat, inputs[1][meta.token_seq >= 0].to(kc.dtype))
    if name == "triton":
        assert (out[meta.token_seq < 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_cuda_graph_replay_matches_eager(dtype, kind):
    """Capture on one step's contents, replay on another's with the same shapes (other lengths, tables, values)."""
    backend = make_backend("triton", dtype)
    gen = torch.Generator().manual_seed(7)
    seqs_a = decode_seqs(gen, 24) if kind == "decode" else mixed_seqs(gen)
    seqs_b = [(int(torch.randint(100, 2000, (1,), generator=gen)), n) for _, n in seqs_a]
    static, meta = make_step(gen, seqs_a, dtype=dtype)
    new, meta_b = make_step(gen, seqs_b, dtype=dtype)
    window = 300
    scale = HEAD_DIM**-0.5

    def step():
        return backend.forward(*static, meta, scale=scale, sliding_window=window)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()

    for dst, src in zip(static, new, strict=True):
        dst.copy_(src)
    for field in ("positions", "slot_mapping", "token_seq", "seq_len", "query_start", "block_table"):
        getattr(meta, field).copy_(getattr(meta_b, field))
    graph.replay()
    torch.cuda.synchronize()

    eager, _, _ = run(backend, new, meta_b, window)
    assert torch.equal(graph_out, eager), (graph_out.double() - eager.double()).abs().max().item()
    assert rel_err(graph_out, reference(new, meta_b, window), meta_b) < TOLERANCE[dtype]


@pytest.mark.parametrize("splits", [2, 5, 8, 16])  # 16: past FUSED_COMBINE_MAX_SPLITS, two kernels
def test_splits_combined_by_their_last_program_agree_with_the_combine_kernel_over_many_replays(splits):
    """The fused combine hands partials between programs through a counter: a missing release or a stale read
    would show as a replay whose bits differ. Every replay must give the same bits, close to the two-kernel
    path, and leave the counters at zero."""
    from asyncbatch.strategies.attention.triton_paged import TritonPagedConfig

    make_backend("triton", torch.bfloat16)
    gen = torch.Generator().manual_seed(splits)
    inputs, meta = make_step(gen, decode_seqs(gen, 64), dtype=torch.bfloat16, pad_tokens=5, pad_seqs=2)
    outs = {}
    for fuse in (False, True):
        backend = TritonPaged(TritonPagedConfig(num_splits=splits, fuse_combine=fuse))
        outs[fuse] = run(backend, inputs, meta, None)[0]
    assert (outs[False] - outs[True]).abs().max().item() < 2e-2
    backend = TritonPaged(TritonPagedConfig(num_splits=splits, fuse_combine=True))
    q, k, v, kc, vc = (x.clone() for x in inputs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            out = backend.forward(q, k, v, kc, vc, meta, scale=HEAD_DIM**-0.5, sliding_window=None)
    for _ in range(25):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(outs[True], out)
    assert all(int(buf.abs().sum()) == 0 for buf in backend.split_counters.get(torch.device("cuda", 0), []))
    assert (out[meta.token_seq < 0] == 0).all()


@pytest.mark.parametrize("splits", [1, 2, 3, 16])
@pytest.mark.parametrize("window", [None, 300])
def test_decode_kernel_writing_its_own_kv_matches_the_write_kernel(splits, window):
    """In decode steps the attention kernel stores the step's K/V itself and takes them from registers: the caches
    get the write kernel's bits (outside the trash block, which padding tokens no longer touch) and the output stays
    within bf16 rounding of the two-kernel path, replayed from a graph or not."""
    from asyncbatch.strategies.attention.triton_paged import TritonPagedConfig

    make_backend("triton", torch.bfloat16)
    gen = torch.Generator().manual_seed(100 + splits)
    inputs, meta = make_step(gen, decode_seqs(gen, 48) + [(15, 1), (16, 1)], dtype=torch.bfloat16)
    outs = {}
    for fused in (False, True):
        backend = TritonPaged(TritonPagedConfig(num_splits=splits, fuse_cache_write="always" if fused else "never"))
        outs[fused] = run(backend, inputs, meta, window)
    assert torch.equal(outs[False][1][1:], outs[True][1][1:]) and torch.equal(outs[False][2][1:], outs[True][2][1:])
    assert (outs[False][0] - outs[True][0]).abs().max().item() < 2e-2
    assert rel_err(outs[True][0], reference(inputs, meta, window), meta) < TOLERANCE[torch.bfloat16]
    backend = TritonPaged(TritonPagedConfig(num_splits=splits, fuse_cache_write="always"))
    q, k, v, kc, vc = (x.clone() for x in inputs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, kc, vc, meta, scale=HEAD_DIM**-0.5, sliding_window=window)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(outs[True][0], out)
