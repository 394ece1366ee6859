"""`AsyncEngine` without HTTP: streamed tokens equal `Engine.generate`, requests join a running batch between
steps, abort frees blocks, the queue bound, per-request failures, graceful shutdown, a dead step loop; the open
request book on its own; and `asyncbatch.serve` imports nothing heavy.

CPU only, the tiny model in float64 (token identity is asserted: no argmax may flip on rounding).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from test_import_graph import import_graph

from asyncbatch import Engine, EngineConfig, RequestError, SamplingParams
from asyncbatch.core.book import RequestBook
from asyncbatch.core.open_book import BookClosedError, OpenRequestBook
from asyncbatch.core.requests import RequestState
from asyncbatch.core.types import Request
from asyncbatch.serve import AsyncEngine, EngineClosedError, EngineDeadError, QueueFullError, ServeObserver

PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [9] * 20, [300, 301]]
PARAMS = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=7, temperature=0.8, seed=3),
          SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=5),
          SamplingParams(max_new_tokens=9, temperature=0.5, top_k=20, seed=11)]
LONG = SamplingParams(max_new_tokens=2000, ignore_eos=True)


def _run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _tokens(stream) -> list[int]:
    return [ev.token_id async for ev in stream]


@pytest.fixture(scope="module")
def engine(tiny64):
    return Engine.from_model(tiny64, EngineConfig.from_dict({"runtime": "cpu", "batch": {"max_seqs": 16}}))


@pytest.fixture(scope="module")
def reference(engine):
    return [list(o.token_ids) for o in engine.generate(PROMPTS, PARAMS)]


class Steps(ServeObserver):
    def __init__(self) -> None:
        self.seqs: list[int] = []

    def step(self, stats) -> None:
        self.seqs.append(stats.num_seqs)


def test_streamed_tokens_equal_generate(engine, reference):
    async def main():
        async with AsyncEngine(engine) as live:
            streams = [live.add_request(p, q) for p, q in zip(PROMPTS, PARAMS)]
            return [await _tokens(s) for s in streams], [s.output for s in streams]

    tokens, outputs = _run(main())

    assert reference == tokens
    assert [tuple(t) for t in reference] == [o.token_ids for o in outputs]


def test_observers_get_steps_on_the_step_loop_and_request_events_on_the_event_loop(engine, reference):
    """Per token the step loop only reads the clock: the per-request observer calls run on the event loop's
    thread (a first token, one gap per further token, and the end)."""
    import threading

    class Threads(ServeObserver):
        def __init__(self) -> None:
            self.calls: list[tuple[str, int]] = []

        def step(self, stats) -> None:
            self.calls.append(("step", threading.get_ident()))

        def first_token(self, seconds) -> None:
            self.calls.append(("first", threading.get_ident()))

        def token_gap(self, seconds) -> None:
            self.calls.append(("gap", threading.get_ident()))

        def finished(self, output, seconds) -> None:
            self.calls.append(("end", threading.get_ident()))

    seen = Threads()

    async def main():
        async with AsyncEngine(engine, observers=[seen]) as live:
            await _tokens(live.add_request(PROMPTS[0], PARAMS[0]))
        return threading.get_ident()

    event_loop = _run(main())

    requests = sorted(kind for kind, _ in seen.calls if kind != "step")
    assert sorted(["first", "end"] + ["gap"] * (len(reference[0]) - 1)) == requests
    assert {event_loop} == {thread for kind, thread in seen.calls if kind != "step"}
    assert event_loop not in {thread for kind, thread in seen.calls if kind == "step"}


def test_requests_arriving_while_running_join_its_batch(engine, reference):
    """A long request runs; the others are submitted after its first tokens and share its steps."""
    observer = Steps()

    async def main():
        async with AsyncEngine(engine, observers=[observer]) as live:
            long = live.add_request([7, 8, 9], LONG)
            seen = 0
            async for _ in long:
                seen += 1
                if seen == 3:
                    break
            streams = [live.add_request(p, q) for p, q in zip(PROMPTS, PARAMS)]
            tokens = [await _tokens(s) for s in streams]
            long.abort()
            return tokens, await long.result()

    tokens, long_out = _run(main())

    assert reference == tokens
    assert "cancelled" == long_out.finish_reason
    assert len(PROMPTS) + 1 == max(observer.seqs)  # every request in one step with the running one


def test_arrivals_between_steps_keep_the_pipeline_race_free(tiny64, reference):
    """On the sim runtime (ops reordered as their events allow, every conflicting access checked) with three
    slots, requests that arrive while batches are in flight get the tokens of `generate`, and nothing races."""
    from asyncbatch.core.races import race_report

    sim = Engine.from_model(tiny64, EngineConfig.from_dict({
        "runtime": {"name": "sim", "check": True}, "buffers": {"name": "n_slot", "num_slots": 3},
        "graphs": "per_slot"}))

    async def main():
        async with AsyncEngine(sim) as live:
            first = live.add_request(PROMPTS[0], PARAMS[0])
            tokens = [(await first.__anext__()).token_id]
            rest = [live.add_request(p, q) for p, q in zip(PROMPTS[1:], PARAMS[1:])]
            return [tokens + await _tokens(first)] + [await _tokens(s) for s in rest]

    assert reference == _run(main())
    report = race_report(sim.runtime)
    assert report is not None and not report


def test_abort_frees_the_requests_blocks_and_row(engine):
    async def main():
        async with AsyncEngine(engine) as live:
            stream = live.add_request([5] * 40, LONG)
            async for ev in stream:
                if ev.index == 2:
                    held = live.stats()
                    assert stream.abort()
            out = stream.output
            for _ in range(200):  # the release happens in the step loop's thread
                if live.stats()["kv_blocks_used"] == 0:
                    break
                await asyncio.sleep(0.01)
            return held, out, live.stats()

    held, out, after = _run(main())

    assert 1 == held["running"] and held["kv_blocks_used"] >= 3  # 40 + 3 tokens or more, in blocks of 16
    assert "cancelled" == out.finish_reason
    assert {"waiting": 0, "running": 0, "kv_blocks_used": 0} == {k: after[k] for k in ("waiting", "running",
                                                                                        "kv_blocks_used")}


def test_a_full_queue_refuses_with_queue_full_error(tiny64):
    one_row = Engine.from_model(tiny64, EngineConfig.from_dict({"runtime": "cpu", "batch": {"max_seqs": 1}}))

    async def main():
        async with AsyncEngine(one_row, max_waiting=2) as live:
            running = live.add_request([1, 2], LONG)
            await running.__anext__()  # it holds the only row
            queued = [live.add_request([3, 4], SamplingParams(max_new_tokens=2)) for _ in range(2)]
            with pytest.raises(QueueFullError, match=r"2 requests already wait for a row \(engine.serve.max_waiting=2"):
                live.add_request([5, 6], SamplingParams(max_new_tokens=2))
            running.abort()
            done = [await q.result() for q in queued]
            later = await live.add_request([5, 6], SamplingParams(max_new_tokens=2)).result()
            return done, later

    done, later = _run(main())

    assert ["length", "length", "length"] == [o.finish_reason for o in [*done, later]]


def test_invalid_requests_fail_alone_with_the_reason(engine, reference):
    async def main():
        async with AsyncEngine(engine) as live:
            with pytest.raises(RequestError, match=r"prompt token 100000 at position 1 is outside the vocabulary"):
                live.add_request([1, 100000], SamplingParams())
            with pytest.raises(RequestError, match="leaves no room to generate"):
                live.add_request([1] * engine.max_len, SamplingParams())
            with pytest.raises(RequestError, match="temperature must be >= 0"):
                live.add_request([1], SamplingParams(temperature=-1.0))
            with pytest.raises(RequestError, match="text prompts need a tokenizer"):
                live.add_request("hello", SamplingParams())
            return [ev.token_id async for ev in live.add_request(PROMPTS[0], PARAMS[0])]

    assert reference[0] == _run(main())


def test_a_request_that_cannot_be_scheduled_fails_at_the_end_of_its_stream(tiny64, reference):
    strict = Engine.from_model(tiny64, EngineConfig.from_dict({
        "runtime": "cpu", "scheduler": {"name": "fifo", "chunked_prefill": False},
        "batch": {"max_tokens": 32, "max_seqs": 8}}))

    async def main():
        async with AsyncEngine(strict) as live:
            too_big = live.add_request([1] * 40, SamplingParams(max_new_tokens=4))
            fine = live.add_request(PROMPTS[0], PARAMS[0])
            with pytest.raises(RequestError, match="does not fit one batch"):
                await too_big.result()
            return [ev.token_id async for ev in fine]

    assert reference[0] == _run(main())


def test_shutdown_lets_requests_in_flight_finish(engine, reference):
    async def main():
        live = AsyncEngine(engine)
        await live.start()
        streams = [live.add_request(p, q) for p, q in zip(PROMPTS, PARAMS)]
        await live.shutdown(timeout=30)
        with pytest.raises(EngineClosedError):
            live.add_request([1], SamplingParams())
        return [await _tokens(s) for s in streams]  # read after the shutdown: nothing lost

    assert reference == _run(main())


def test_shutdown_timeout_cancels_the_rest_and_keeps_what_completed(engine, reference):
    async def main():
        live = AsyncEngine(engine)
        await live.start()
        short = live.add_request(PROMPTS[0], PARAMS[0])
        long = live.add_request([7, 8], LONG)
        await _until(lambda: short.ended)  # completed, not read yet
        await live.shutdown(timeout=0.05)
        long_tokens = [ev.token_id async for ev in long]
        return [ev.token_id async for ev in short], short.output, long.output, long_tokens

    tokens, short_out, long_out, long_tokens = _run(main())

    assert (reference[0], "length") == (tokens, short_out.finish_reason)
    assert "cancelled" == long_out.finish_reason
    assert list(long_out.token_ids) == long_tokens and 0 < len(long_tokens) < 2000


async def _until(condition, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met in time")


def test_a_dead_step_loop_fails_open_streams_and_new_requests(engine, reference):
    class Boom(ServeObserver):
        def step(self, stats) -> None:
            raise RuntimeError("boom in step")

    async def main():
        async with AsyncEngine(engine, observers=[Boom()]) as live:
            stream = live.add_request([1, 2, 3], SamplingParams(max_new_tokens=5))
            with pytest.raises(EngineDeadError, match="RuntimeError: boom in step"):
                await stream.result()
            with pytest.raises(EngineDeadError, match="boom in step"):
                live.add_request([1], SamplingParams())
            assert not live.accepting

    _run(main())
    # The engine was handed back: it runs offline again.
    assert reference[0] == list(engine.generate([PROMPTS[0]], PARAMS[0])[0].token_ids)


def test_a_call_back_into_the_served_engine_from_its_step_loop_fails_instead_of_deadlocking(engine, reference):
    class CallsBack(ServeObserver):
        def step(self, stats) -> None:
            engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))

    async def main():
        async with AsyncEngine(engine, observers=[CallsBack()]) as live:
            stream = live.add_request([1, 2, 3], SamplingParams(max_new_tokens=5))
            with pytest.raises(EngineDeadError, match="this engine is running a call on this thread"):
                await stream.result()

    _run(main())
    assert reference[0] == list(engine.generate([PROMPTS[0]], PARAMS[0])[0].token_ids)  # and it was handed back


def test_the_open_book_hand_off():
    book = OpenRequestBook(num_blocks=8, num_rows=2)

    def state(rid: str) -> RequestState:
        return RequestState(Request(rid, (1, 2)), 0, 64, 0)

    book.submit(state("a"))
    with pytest.raises(ValueError, match="'a' is already used"):
        book.submit(state("a"))
    assert (False, True) == (book.cancel("nope"), book.cancel("a"))
    assert (1, 1) == (book.unfinished, book.num_queued)
    book.admit_arrivals(0.0)
    book.apply_cancellations(0.0)  # cancelled as soon as admitted: ended, forgotten
    assert (0, 0, {}) == (book.unfinished, book.num_queued, book.outputs)
    book.close()
    with pytest.raises(BookClosedError):
        book.submit(state("b"))
    assert False is book.wait_for_arrivals()  # closed and empty: the run ends
    assert False is RequestBook([], num_blocks=8, num_rows=2).wait_for_arrivals()


def test_importing_serve_is_light():
    code = ("import sys, asyncbatch, asyncbatch.serve, asyncbatch.cli; asyncbatch.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'uvicorn', 'starlette', "
            "'prometheus_client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert "[]" == out.strip()


def test_core_never_imports_serve():
    graph = import_graph()

    assert set() == {(m, d) for m in graph if m.startswith("asyncbatch.core") for d in graph[m]
                     if d.startswith("asyncbatch.serve")}


def test_the_step_loop_reads_its_cpu_clocks_every_32_steps_and_when_it_goes_idle(engine, monkeypatch):
    """Not every step (a clock read is a system call on the hot path), and together with the process's, so that
    the metrics' serving cost outside the loop never counts loop time. The idle reading makes the last steps show."""
    import asyncbatch.serve.live as live_module

    reads = []

    def counted():
        reads.append(None)
        return real()

    real = live_module.cpu_times
    monkeypatch.setattr(live_module, "cpu_times", counted)
    observer = Steps()

    async def main():
        async with AsyncEngine(engine, observers=[observer]) as live:
            await _tokens(live.add_request([5, 6, 7], SamplingParams(max_new_tokens=100, ignore_eos=True)))
            for _ in range(200):  # the loop goes idle, reads its clocks, then blocks
                if len(reads) and live._book.unfinished == 0 and live.stats()["step_loop_cpu_s"] > 0:
                    break
                await asyncio.sleep(0.01)
            return live.stats(), len(reads)

    stats, n = _run(main())
    steps = len(observer.seqs)
    assert steps >= 100
    assert steps // 32 <= n <= steps // 32 + 3  # at the start, every 32nd step, and at each idle wait
    assert 0 < stats["step_loop_cpu_s"] <= stats["engine_cpu_s"]
