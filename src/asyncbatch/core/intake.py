"""Requests in: prompts encoded and paired with parameters, ids, seeds, and per-request validation.

A mistake in the call itself (prompts not a list, mismatched lengths, duplicate ids) raises at once. A mistake in
one request (a token outside the vocabulary, a sampling value the step tables cannot hold, an arrival time that is
not a finite number) fails that request only: it ends with finish reason `error` and a message naming the field,
before the run starts, and everything else runs.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import Any

from .errors import RequestError
from .requests import RequestState, Status
from .types import Request, SamplingParams, validate_arrival


def derive_seed(engine_seed: int, request_id: str) -> int:
    """A request's sampling seed when it gives none: a function of the engine's seed and the request's id only
    (stable across processes), so its tokens do not depend on its position in the call."""
    digest = hashlib.blake2b(f"{engine_seed}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Intake:
    """Turns a call's prompts into requests and requests into request states, for one engine."""

    def __init__(self, *, tokenizer: Any, vocab: int, max_len: int, limits: str, seed: int,
                 eos_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.max_len = max_len
        self.limits = limits  # what bounds max_len, for the too-long-prompt message
        self.seed = seed
        self.eos_ids = eos_ids
        self._next_id = itertools.count()  # default request ids, unique over the engine's lifetime

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments: `Intake(**intake.settings())` validates and seeds requests exactly as this
        one does (a front end in another process builds its own from them)."""
        return {"tokenizer": self.tokenizer, "vocab": self.vocab, "max_len": self.max_len, "limits": self.limits,
                "seed": self.seed, "eos_ids": self.eos_ids}

    def make_requests(self, prompts: Sequence[Any], params: SamplingParams | Sequence[SamplingParams] | None,
                      *, request_ids: Sequence[str] | None, arrival_times: Sequence[float] | None) -> list[Request]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of prompts (token-id lists or strings)")
        n = len(prompts)
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            plist = [params] * n
        elif isinstance(params, Sequence) and not isinstance(params, (str, bytes)):
            plist = list(params)
        else:
            raise TypeError(f"params must be a SamplingParams or a list of them, got {type(params).__name__}")
        if len(plist) != n:
            raise ValueError(f"got {n} prompts but {len(plist)} SamplingParams")
        for i, p in enumerate(plist):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params {i} must be a SamplingParams, got {type(p).__name__}")
        if isinstance(request_ids, (str, bytes)):  # a str is a sequence too: "ab" would name two prompts a and b
            raise TypeError(f"request_ids must be a list of strings, one per prompt, got the string {request_ids!r}")
        ids = list(request_ids) if request_ids is not None else [str(next(self._next_id)) for _ in range(n)]
        _check_ids(ids)
        if len(ids) != n or len(set(ids)) != n:
            raise ValueError("request_ids must be unique, one per prompt")
        times = list(arrival_times) if arrival_times is not None else [0.0] * n
        if len(times) != n:
            raise ValueError(f"got {n} prompts but {len(times)} arrival times")
        out = []
        for i in range(n):
            p = self._encode(prompts[i])
            prompt = tuple(p) if isinstance(p, (list, tuple)) else p
            if not isinstance(prompt, tuple):
                raise TypeError(f"prompt {i} must be a list of token ids or a string, got {type(p).__name__}")
            out.append(Request(ids[i], prompt, plist[i], times[i]))
        return out

    @staticmethod
    def check_requests(requests: Any) -> None:
        """`Engine.run`'s call-level checks, as `make_requests` makes them: a list of `Request`s with distinct str
        ids. A duplicate id would otherwise run silently, and `cancel(id)`, the derived seed and a stream's events
        could not tell the two requests apart."""
        if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
            raise TypeError(f"requests must be a list of asyncbatch Requests, got {type(requests).__name__}")
        seen: set[str] = set()
        for i, r in enumerate(requests):
            if not isinstance(r, Request):
                raise TypeError(f"request {i} must be an asyncbatch Request (Engine.make_requests builds them from "
                                f"prompts), got {type(r).__name__}")
            _check_ids([r.request_id])
            if r.request_id in seen:
                raise ValueError(f"request id {r.request_id!r} is used by more than one request (request {i})")
            seen.add(r.request_id)

    def _encode(self, prompt: Any) -> Any:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TypeError("text prompts need a tokenizer (engine.model.tokenizer or a checkpoint with one); "
                                "pass token-id lists instead")
            return self.tokenizer.encode(prompt)
        return prompt

    def state(self, request: Request, index: int, *, validated: bool = False) -> RequestState:
        """The run-time state of `request`; already finished with `error` if the request is invalid. `validated`:
        an `Intake` with the same settings has already accepted it (a front end in another process), so the
        per-token checks are not run twice."""
        try:
            if not validated:
                self.validate(request)
        except RequestError as exc:
            # A neutral stand-in carries the failure: the bad values never reach a step table or a scheduler.
            req = RequestState(Request(request.request_id, request.prompt_ids), index, self.max_len, 0)
            req.status = Status.FINISHED
            req.finish_reason = "error"
            req.error = str(exc)
            return req
        seed = request.params.seed
        return RequestState(request, index, self.max_len, seed if seed is not None else
                            derive_seed(self.seed, request.request_id), eos_ids=self.eos_ids)

    def validate(self, request: Request) -> None:
        vocab = self.vocab
        ids = request.prompt_ids
        if len(ids) == 0:
            raise RequestError("empty prompt: a request needs at least one prompt token")
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int):
                raise RequestError(f"prompt token {t!r} at position {i} is a {type(t).__name__}, not an int "
                                   f"(token ids are Python ints)")
            if not 0 <= t < vocab:
                raise RequestError(f"prompt token {t!r} at position {i} is outside the vocabulary [0, {vocab})")
        if not isinstance(request.params, SamplingParams):  # a Request is built unchecked: not an AttributeError
            raise RequestError(f"params must be a SamplingParams, got {type(request.params).__name__}")
        request.params.validate()
        validate_arrival(request.arrival_time)
        for t in request.params.stop_token_ids:
            if t >= vocab:
                raise RequestError(f"stop token {t} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_len:
            raise RequestError(f"prompt of {len(ids)} tokens leaves no room to generate: at most {self.max_len - 1} "
                               f"prompt tokens fit ({self.limits})")


def _check_ids(ids: list[Any]) -> None:
    # Ids are strings: `cancel("5")` must find the request, and results are keyed (and written) by id.
    for rid in ids:
        if not isinstance(rid, str):
            raise TypeError(f"request ids must be strings, got {type(rid).__name__} {rid!r}")
