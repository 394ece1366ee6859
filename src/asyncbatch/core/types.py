"""Frozen value types shared by every part of asyncbatch. No torch here: schedulers and configs import these."""

from __future__ import annotations

import math
from typing import Literal

import attrs

from .errors import RequestError

FinishReason = Literal["length", "stop", "cancelled", "error"]
FINISH_REASONS: tuple[str, ...] = ("length", "stop", "cancelled", "error")


def _check_sampling(params: SamplingParams) -> None:
    if not isinstance(params.max_new_tokens, int) or isinstance(params.max_new_tokens, bool):
        raise RequestError(f"max_new_tokens must be an int, got {params.max_new_tokens!r}")
    if params.max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if not (isinstance(params.temperature, (int, float)) and math.isfinite(params.temperature)):
        raise RequestError(f"temperature must be a finite number, got {params.temperature!r}")
    if params.temperature < 0:
        raise RequestError(f"temperature must be >= 0 (0 means greedy), got {params.temperature}")
    if not isinstance(params.top_k, int) or params.top_k < 0:
        raise RequestError(f"top_k must be an int >= 0 (0 disables it), got {params.top_k!r}")
    if not (isinstance(params.top_p, (int, float)) and 0.0 < params.top_p <= 1.0):
        raise RequestError(f"top_p must be in (0, 1], got {params.top_p!r}")
    if params.seed is not None and (not isinstance(params.seed, int) or params.seed < 0):
        raise RequestError(f"seed must be a non-negative int or None, got {params.seed!r}")
    if not isinstance(params.ignore_eos, bool):
        raise RequestError(f"ignore_eos must be a bool, got {params.ignore_eos!r}")
    for tok in params.stop_token_ids:
        if not isinstance(tok, int) or tok < 0:
            raise RequestError(f"stop_token_ids must hold non-negative ints, got {tok!r}")


@attrs.frozen
class SamplingParams:
    """How to pick each new token of one request.

    `temperature == 0` is greedy (argmax); `top_k == 0` and `top_p == 1` disable those filters. With a `seed`,
    sampling is reproducible whatever else shares the batch: the noise for token i of a request is a pure function
    of (seed, i, vocabulary index). Without one, the engine derives a seed from its own seed and the request id.

    The model's end-of-sequence tokens (its generation config) end a request with finish reason `stop`, as they
    end `generate()`; `ignore_eos` keeps generating past them (benchmarks of fixed output lengths).

    Validation is lazy on purpose: a bad value fails the one request that carries it (see `validate`), not the
    whole `generate` call.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    seed: int | None = None
    priority: int = 0
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise `RequestError` naming the first invalid field."""
        _check_sampling(self)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_filter(self) -> bool:
        return not self.is_greedy and (self.top_k > 0 or self.top_p < 1.0)

    @property
    def sample_mode(self) -> str:
        """The sampling path: `greedy`, `sample`, or `filter` (top-k/top-p). A batch takes its most general one."""
        return "greedy" if self.is_greedy else "filter" if self.needs_filter else "sample"


@attrs.frozen
class Request:
    """One prompt to complete. `arrival_time` is seconds after the run starts (online workloads); 0 = at once."""

    request_id: str
    prompt_ids: tuple[int, ...] = attrs.field(converter=tuple)
    params: SamplingParams = SamplingParams()
    arrival_time: float = 0.0


@attrs.frozen
class TokenEvent:
    """One token delivered to the host, in order, for streaming consumers."""

    request_id: str
    token_id: int
    index: int
    time: float
    finish_reason: FinishReason | None = None


@attrs.frozen
class Output:
    """The result of one request, returned in input order by `Engine.generate`.

    `token_times` holds one host timestamp (seconds since the run started) per generated token: the moment the
    host learned the token. `first_token_time - arrival_time` is the time to first token.
    """

    request_id: str
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    error: str | None = None
    token_times: tuple[float, ...] = ()
    arrival_time: float = 0.0
    finish_time: float = 0.0
    num_preemptions: int = 0
    text: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def inter_token_latencies(self) -> tuple[float, ...]:
        t = self.token_times
        return tuple(b - a for a, b in zip(t, t[1:]))

    @property
    def latency(self) -> float:
        return self.finish_time - self.arrival_time
