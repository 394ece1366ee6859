"""The front end in a process of its own (`engine.serve.front_end: process`).

First the two ends of the pipe in one process (`EngineCore` on a thread, `RemoteEngine` on the event loop), where
every message can be watched: tokens equal offline generation, an abort frees the blocks, the queue bound holds, a
bad request never crosses the pipe, a dying step loop fails the streams, a lost front end cancels the work. Then
`asyncbatch serve` itself in a subprocess: 200 concurrent requests, a client that disconnects, and each process
stopping when the other dies or is signalled.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_process import ServeProcess

from asyncbatch import Engine, EngineConfig, RequestError, SamplingParams
from asyncbatch.core.intake import Intake
from asyncbatch.serve import EngineDeadError, QueueFullError
from asyncbatch.serve.base import ServeObserver
from asyncbatch.serve.engine_core import CPU_EVERY, EngineCore
from asyncbatch.serve.live import served_model
from asyncbatch.serve.remote import RemoteEngine

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def _engine(model) -> Engine:
    return Engine.from_model(model, EngineConfig.from_dict({"runtime": "cpu", "batch": {"max_seqs": 4}}))


async def _streamed(stream) -> list[int]:
    return [ev.token_id async for ev in stream]


class Linked:
    """`EngineCore` serving on a thread, `RemoteEngine` at the other end of a pipe."""

    def __init__(self, engine: Engine, *, max_waiting: int = 512) -> None:
        ours, theirs = multiprocessing.Pipe(duplex=True)
        self.engine = engine
        self.core = EngineCore(engine, ours)
        self.lost_calls = 0
        self.remote = RemoteEngine(theirs, ring_name=self.core.ring.name, served=served_model(engine), intake=Intake(**engine.intake.settings()),
                                   max_waiting=max_waiting, shutdown_timeout_s=5.0, on_lost=self._lost)
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _lost(self) -> None:
        self.lost_calls += 1

    def _serve(self) -> None:
        self.failure = self.core.serve()

    async def __aenter__(self) -> Linked:
        self.thread.start()
        await self.remote.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.remote.shutdown()
        await asyncio.to_thread(self.thread.join, 30)
        assert not self.thread.is_alive()
        self.core.ring.close(unlink=True)


def test_streamed_tokens_equal_offline_generation(tiny32):
    engine = _engine(tiny32)
    prompts = [[1, 2, 3], list(range(5, 40)), [7] * 12, [3, 1, 4, 1, 5, 9, 2, 6], [11, 12]]
    params = [SamplingParams(max_new_tokens=n, temperature=t) for n, t in
              ((9, 0.0), (14, 0.8), (6, 1.0), (20, 0.0), (3, 0.5))]
    ids = [f"r{i}" for i in range(len(prompts))]
    expected = [list(o.token_ids) for o in engine.generate(prompts, params, request_ids=ids)]

    async def main():
        async with Linked(engine) as link:
            streams = [link.remote.add_request(p, sp, request_id=i) for p, sp, i in zip(prompts, params, ids)]
            got = [await _streamed(s) for s in streams]
            return got, [list(s.output.token_ids) for s in streams], [s.output.finish_reason for s in streams], \
                link.remote.stats()

    got, outputs, reasons, stats = asyncio.run(main())
    assert (expected, expected) == (got, outputs)
    assert ["length"] * 5 == reasons
    assert (0, 0, 0) == (stats["waiting"], stats["running"], stats["kv_blocks_used"])
    assert stats["step_loop_cpu_s"] > 0 and stats["front_end_cpu_s"] > 0


def test_every_steps_stats_reach_the_observers_in_order_though_most_steps_send_none(tiny32):
    class Steps(ServeObserver):
        def __init__(self) -> None:
            self.batches: list[int] = []

        def step(self, stats) -> None:
            self.batches.append(stats.batch)

    engine = _engine(tiny32)
    seen = Steps()

    async def main():
        async with Linked(engine) as link:
            link.remote.observers.append(seen)
            streams = [link.remote.add_request(list(range(1, 20 + i)), SamplingParams(max_new_tokens=70 + 9 * i))
                       for i in range(3)]
            for s in streams:
                await _streamed(s)
            for _ in range(500):  # the idle loop sends the last ones
                if len(seen.batches) >= link.core._steps_sent:
                    break
                await asyncio.sleep(0.01)
            return link.core._steps_sent

    steps = asyncio.run(main())
    assert steps > 2 * CPU_EVERY  # so that several full messages carried stats, and most steps none
    assert list(range(steps)) == seen.batches


def test_an_abort_ends_the_request_and_frees_its_blocks(tiny32):
    async def main():
        async with Linked(_engine(tiny32)) as link:
            stream = link.remote.add_request(list(range(1, 60)), SamplingParams(max_new_tokens=1000))
            seen = [await stream.__anext__() for _ in range(2)]
            used = link.remote.stats()["kv_blocks_used"]
            assert stream.abort()
            rest = [ev async for ev in stream]
            for _ in range(100):  # the idle loop reports its last counts when it goes to sleep
                if link.remote.stats()["kv_blocks_used"] == 0:
                    break
                await asyncio.sleep(0.01)
            return used, len(seen) + len(rest), stream.output.finish_reason, link.remote.stats()["kv_blocks_used"]

    used, n, reason, after = asyncio.run(main())
    assert used >= 4 and n < 1000
    assert ("cancelled", 0) == (reason, after)


def test_the_queue_bound_counts_requests_still_on_their_way(tiny32):
    async def main():
        async with Linked(_engine(tiny32), max_waiting=3) as link:
            kept = [link.remote.add_request([1, 2, 3], SamplingParams(max_new_tokens=4)) for _ in range(3)]
            with pytest.raises(QueueFullError, match=r"3 requests already wait for a row"):
                link.remote.add_request([1, 2, 3])  # same tick: the engine has not reported any of them yet
            return [len((await s.result()).token_ids) for s in kept]

    assert [4, 4, 4] == asyncio.run(main())


def test_a_bad_request_is_refused_by_the_front_end_alone(tiny32):
    async def main():
        async with Linked(_engine(tiny32)) as link:
            with pytest.raises(RequestError, match=r"prompt token 100000 at position 1 is outside the vocabulary"):
                link.remote.add_request([1, 100000])
            with pytest.raises(RequestError, match="temperature"):
                link.remote.add_request([1], SamplingParams(temperature=-1.0))
            good = await link.remote.add_request([1, 2], SamplingParams(max_new_tokens=2)).result()
            return link.core._added, len(good.token_ids)

    assert (1, 2) == asyncio.run(main())  # only the good request crossed the pipe


def test_a_step_loop_that_dies_fails_every_stream_and_calls_on_lost(tiny32, monkeypatch):
    engine = _engine(tiny32)
    run = engine.pipeline.run

    def failing_run(book, *, on_step, **kw):
        steps = []

        def step(stats):
            steps.append(stats)
            if len(steps) == 3:
                raise RuntimeError("boom on the third step")
            on_step(stats)

        return run(book, on_step=step, **kw)

    monkeypatch.setattr(engine.pipeline, "run", failing_run)

    async def main():
        link = Linked(engine)
        link.thread.start()
        await link.remote.start()
        stream = link.remote.add_request([1, 2, 3], SamplingParams(max_new_tokens=50))
        with pytest.raises(EngineDeadError, match="RuntimeError: boom on the third step"):
            await stream.result()
        await asyncio.to_thread(link.thread.join, 30)
        link.core.ring.close(unlink=True)
        return link, link.remote.accepting

    link, accepting = asyncio.run(main())
    assert (False, 1) == (accepting, link.lost_calls)
    assert isinstance(link.failure, RuntimeError)
    monkeypatch.undo()
    assert 2 == len(engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))[0].token_ids)  # released


def test_a_front_end_that_goes_away_cancels_everything(tiny32):
    engine = _engine(tiny32)

    async def main():
        link = Linked(engine)
        link.thread.start()
        await link.remote.start()
        for _ in range(3):
            link.remote.add_request(list(range(1, 30)), SamplingParams(max_new_tokens=10_000))
        await asyncio.sleep(0.2)
        # The front end's process dies: its end of the socket pair shuts (closing the Connection object from here
        # would pull it from under the reader thread instead).
        socket.socket(fileno=os.dup(link.remote.conn.fileno())).shutdown(socket.SHUT_RDWR)
        await asyncio.to_thread(link.thread.join, 30)
        link.core.ring.close(unlink=True)
        return link

    link = asyncio.run(main())
    assert not link.thread.is_alive()
    assert (None, True, 0, 0) == (link.failure, link.core.lost, link.core.book.unfinished,
                                  link.core.book.blocks.num_owned)


# ---------------------------------------------------------------------- `asyncbatch serve`, two processes
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_two_hundred_concurrent_requests_all_complete():
    async def main(url: str):
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "tiny", "max_tokens": 5, "temperature": 0}
            replies = await asyncio.gather(*[client.post(url + "/v1/completions", json={**body, "prompt": [1 + i % 50, 2]})
                                             for i in range(200)])
        return [(r.status_code, len(r.json()["choices"][0]["token_ids"])) for r in replies]

    with ServeProcess(DEFAULT) as srv:
        assert srv.front_end_pid is not None and srv.front_end_pid != srv.proc.pid
        results = asyncio.run(main(srv.url))
        finished = _metric(srv.url, 'asyncbatch_requests_finished_total{finish_reason="length"}')
    assert [(200, 5)] * 200 == results
    assert 200 == finished
    assert 0 == srv.code, srv.text


def test_a_client_that_disconnects_mid_stream_frees_its_blocks():
    # The 50M-parameter preset: 2,000 tokens take it many seconds on a CPU, so the request cannot end by itself
    # before the disconnect is noticed (the tiny model would race it).
    with ServeProcess(DEFAULT, "engine.model.preset=small") as srv:
        body = {"model": "small", "prompt": list(range(1, 100)), "max_tokens": 2000, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            first = [next(lines) for _ in range(3)]
            used = _metric(srv.url, "asyncbatch_kv_blocks_used")
        for _ in range(200):
            if _metric(srv.url, "asyncbatch_kv_blocks_used") == 0:
                break
            time.sleep(0.02)
        cancelled = _metric(srv.url, 'asyncbatch_requests_finished_total{finish_reason="cancelled"}')
        after = _metric(srv.url, "asyncbatch_kv_blocks_used")
    assert all(line.startswith("data: ") for line in first if line)
    assert used >= 7  # 99 prompt tokens and more in blocks of 16
    assert (1, 0) == (cancelled, after)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_engine_process_stops_both_gracefully(sig):
    with ServeProcess(DEFAULT) as srv:
        assert 200 == httpx.get(srv.url + "/health").status_code
        code = srv.stop(sig)
    assert 0 == code, srv.text
    assert "Application shutdown complete" in srv.text
    assert _gone_within(srv.front_end_pid, 10)


def test_a_front_end_that_dies_stops_the_server_with_an_error():
    with ServeProcess(DEFAULT) as srv:
        os.kill(srv.front_end_pid, signal.SIGKILL)
        code = srv.wait(60)
    assert 1 == code, srv.text
    assert "the HTTP front end went away" in srv.text
    assert f"the HTTP front-end process {srv.front_end_pid} exited with code -9" in srv.text


def test_an_engine_process_that_dies_takes_the_front_end_with_it():
    with ServeProcess(DEFAULT) as srv:
        srv.proc.kill()
        srv.wait(30)
        gone = _gone_within(srv.front_end_pid, 30)
    assert gone, srv.text
    assert "the engine stopped serving: the engine's process exited" in srv.text


def test_tokens_are_the_same_when_every_step_goes_by_the_pipe(tiny32, monkeypatch):
    """Where the ring is off (processors that may reorder stores), the pipe carries every step."""
    engine = _engine(tiny32)
    prompts, params = [[1, 2, 3], [4, 5, 6, 7]], SamplingParams(max_new_tokens=7, temperature=0.7)
    expected = [list(o.token_ids) for o in engine.generate(prompts, params, request_ids=["a", "b"])]

    async def main():
        async with Linked(engine) as link:
            link.core.ring.enabled = False
            streams = [link.remote.add_request(p, params, request_id=i) for p, i in zip(prompts, ["a", "b"])]
            got = [await _streamed(s) for s in streams]
            return got, link.core._pipe_steps, link.core._steps_sent

    got, pipe_steps, steps_sent = asyncio.run(main())
    assert expected == got
    # How many messages there are depends on how the steps fall (a message carries every token since the last
    # one); that every one of them went by the pipe does not.
    assert 0 < steps_sent == pipe_steps
