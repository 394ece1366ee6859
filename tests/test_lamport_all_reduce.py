"""The barrier-free one-shot all-reduce (`engine.parallel.all_reduce: lamport`) on CPU processes, with Triton's
interpreter: sums, identical bits on every rank, slots handed back to the sentinel, a missing peer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lamport_ranks import run_ranks  # noqa: E402

from asyncbatch.parallel import lamport  # noqa: E402

SIZES = [4096, 100, 2049, 5000, 3, 4096, 7]  # a large call, then small ones, then large again in the same slot


def _calls(world: int, dtype: torch.dtype, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    calls = [[torch.randn(n, generator=gen).to(dtype) for _ in range(world)] for n in SIZES]
    calls[0][0][:16] = -0.0  # the sentinel's bits, as a value: must be summed as zero, not waited for
    calls[1][world - 1][:] = -0.0
    return calls


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_gets_the_float32_sum_in_rank_order_with_the_same_bits(world):
    calls = _calls(world, torch.float32)

    outs, _, states, codes = run_ranks(world, 5000, calls)

    assert [0] * world == codes
    for inputs, out in zip(calls, outs, strict=True):
        expected = inputs[0].clone()
        for x in inputs[1:]:
            expected += x  # rank order, float32, as the kernel sums
        for r in range(world):
            assert torch.equal(expected, out[r])
    assert [[len(SIZES) % 3, 0]] * world == [s[:2].tolist() for s in states]  # the next slot
    assert [0] * world == [int(s[6]) for s in states]  # no poll timed out: -0.0 values were not taken for absent


def test_bfloat16_sums_agree_bit_for_bit_across_ranks_and_round_once():
    world = 2
    calls = _calls(world, torch.bfloat16, seed=1)

    outs, _, _, codes = run_ranks(world, 5000, calls)

    assert [0, 0] == codes
    for inputs, out in zip(calls, outs, strict=True):
        exact = sum(x.float() for x in inputs)
        assert torch.equal(out[0], out[1])
        ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(1e-30)
        assert bool(((out[0].float() - exact).abs() <= ulp).all())  # one rounding of the float32 sum


def test_a_call_hands_the_slot_before_it_back_to_the_sentinel():
    """After k calls only the last call's pushes remain in the buffers; a slot that once held a large call and
    then a small one must not keep the large call's tail (a later call would read it as arrived)."""
    world, cap = 2, 5000
    calls = _calls(world, torch.bfloat16)

    _, bufs, states, _ = run_ranks(world, cap, calls)

    last = (len(SIZES) - 1) % lamport.SLOTS
    for buf, state in zip(bufs, states, strict=True):
        slots = buf.view(lamport.SLOTS, world, cap) != lamport.sentinel(torch.bfloat16)
        assert [0, 0, 0] != slots.sum(dim=(1, 2)).tolist()
        expected = [world * SIZES[-1] if s == last else 0 for s in range(lamport.SLOTS)]
        assert expected == slots.sum(dim=(1, 2)).tolist()
        assert SIZES[-1] == int(state[2 + last])


def test_a_peer_that_never_pushes_times_the_call_out_instead_of_hanging():
    outs, _, states, codes = run_ranks(2, 64, [[torch.ones(8), torch.ones(8)]], ranks=[0])

    assert [0] == codes
    assert 1 == int(states[0][6])  # the flag a GPU run turns into a trap
    assert 0 == int(states[1][0])


def test_the_lamport_all_reduce_is_one_opaque_op_to_torch_compile():
    from asyncbatch.parallel.all_reduce import _register_lamport_op

    _register_lamport_op()
    _register_lamport_op()
    with torch._subclasses.fake_tensor.FakeTensorMode():
        out = torch.ops.asyncbatch.lamport_all_reduce(torch.empty(3, 8, dtype=torch.bfloat16), "group")

    assert ((3, 8), torch.bfloat16) == (tuple(out.shape), out.dtype)


def test_lamport_is_refused_on_rocm_with_the_reason(monkeypatch):
    from asyncbatch.parallel.all_reduce import one_shot_unavailable

    monkeypatch.setattr(torch.version, "hip", "6.2")

    why = one_shot_unavailable(torch.device("cuda", 0), [0, 1], "lamport")

    assert "its kernel is written for NVIDIA GPUs (it traps a dead peer with PTX)" == why
