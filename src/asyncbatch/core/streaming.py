"""`Engine.stream`: a run in a background thread, its tokens handed to the consumer as they arrive."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def stream_events(run: Callable[..., Any], cancel: Callable[[str], None], requests: Sequence[Any], *,
                  forget: Callable[[list[str]], None] | None = None) -> Iterator[Any]:
    """Yield the `TokenEvent`s of `run(requests, on_token=...)` as the host learns them. A consumer that stops
    early cancels its requests (they end at the next step); a failure of the run is raised in the consumer.
    `forget(ids)` then drops those cancels where the run ended first, so none is left to cancel a later run's
    request of the same id."""
    events: queue.Queue = queue.Queue()
    done = object()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            run(requests, on_token=events.put)
        except BaseException as exc:  # re-raised in the consumer's thread
            failure.append(exc)
        finally:
            events.put(done)

    thread = threading.Thread(target=work, name="asyncbatch-engine", daemon=True)
    thread.start()
    finished = False
    try:
        while (item := events.get()) is not done:
            yield item
        finished = True
    finally:
        if not finished:  # the consumer stopped early: its requests end at the next step
            for r in requests:
                cancel(r.request_id)
        thread.join()
        if not finished and forget is not None:
            forget([r.request_id for r in requests])
    if failure:
        raise failure[0]
