"""Frozen value types shared by every part of asyncbatch. No torch here: schedulers and configs import these."""

from __future__ import annotations

import math
import random
from typing import Literal

import attrs

from .errors import RequestError

FinishReason = Literal["length", "stop", "cancelled", "error"]
FINISH_REASONS: tuple[str, ...] = ("length", "stop", "cancelled", "error")


# The engine's per-step tables hold temperature and top_p as float32 bits, top_k and the two halves of the seed as
# int32 (`core.layout.HostBatchWriter.bind_row`); token ids and counts are int32 too. A value outside these ranges
# cannot be written faithfully: it fails its request (see `SamplingParams.validate`).
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SEED_MAX = 2**64 - 1
# Below 1e-4, logits / temperature overflow float32 (1e-40 is a subnormal: every positive logit becomes inf and the
# pick is garbage); above 1e4 every distribution is uniform to float32 precision. 0 means greedy.
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-4, 1e4
TOP_P_MIN = 2.0**-126  # the smallest normal float32: anything smaller rounds to (or towards) 0 in the table
# The latest arrival time a request may have, in seconds after the run starts (about 31.7 years). Past it, the sim
# runtime's virtual time (float64 milliseconds) loses the resolution of a step, then overflows: latencies came out
# as 0, inf or NaN; a real-time run would wait for ever.
ARRIVAL_MAX_S = 1e9


def show(value: object, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters; ints too long to print (Python refuses to convert ints of more
    than 4300 digits to text) are described by their size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"{'-' if value < 0 else ''}<an int of about {int(value.bit_length() * 0.30103) + 1} digits>"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001  (a value whose repr fails still gets a message)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_in(value: object, lo: int, hi: int) -> bool:
    return _is_int(value) and lo <= value <= hi  # type: ignore[operator]


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


def _check_sampling(params: SamplingParams) -> None:
    v = params.max_new_tokens
    if not _int_in(v, 1, INT32_MAX):
        raise RequestError(f"max_new_tokens must be >= 1: an int in [1, {INT32_MAX}], got {show(v)}")
    v = params.temperature
    if not (_is_real(v) and _finite(v) and (v == 0 or TEMPERATURE_MIN <= v <= TEMPERATURE_MAX)):
        raise RequestError(f"temperature must be >= 0: 0 (greedy) or a finite number in "
                           f"[{TEMPERATURE_MIN}, {TEMPERATURE_MAX}], got {show(v)}")
    v = params.top_k
    if not _int_in(v, 0, INT32_MAX):
        raise RequestError(f"top_k must be an int >= 0: in [0, {INT32_MAX}] (0 disables it), got {show(v)}")
    v = params.top_p
    if not (_is_real(v) and _finite(v) and TOP_P_MIN <= v <= 1.0):
        raise RequestError(f"top_p must be in (0, 1] (at least {TOP_P_MIN:.3g}, the smallest float32; "
                           f"1 disables it), got {show(v)}")
    v = params.seed
    if v is not None and not _int_in(v, 0, SEED_MAX):
        raise RequestError(f"seed must be None or an int in [0, {SEED_MAX}], got {show(v)}")
    v = params.stop_token_ids
    if not isinstance(v, tuple):
        raise RequestError(f"stop_token_ids must be a list of token ids, ints in [0, {INT32_MAX}], got {show(v)}")
    for tok in v:
        if not _int_in(tok, 0, INT32_MAX):
            raise RequestError(f"stop_token_ids must hold ints in [0, {INT32_MAX}], got {show(tok)}")
    v = params.priority
    if not _int_in(v, INT64_MIN, INT64_MAX):
        raise RequestError(f"priority must be an int in [{INT64_MIN}, {INT64_MAX}], got {show(v)}")
    if not isinstance(params.ignore_eos, bool):
        raise RequestError(f"ignore_eos must be a bool (true/false), got {show(params.ignore_eos)}")


def validate_arrival(t: object) -> None:
    """Raise `RequestError` unless `t` (a request's `arrival_time`, seconds after the run starts) is a finite
    number in [0, `ARRIVAL_MAX_S`]."""
    if not (_is_real(t) and _finite(t) and t >= 0):  # type: ignore[operator]
        raise RequestError(f"arrival_time must be a finite number >= 0, got {show(t)}")
    if t > ARRIVAL_MAX_S:  # type: ignore[operator]
        raise RequestError(f"arrival_time must be at most {ARRIVAL_MAX_S:g} seconds after the run starts, got "
                           f"{show(t)}")


def seeded_random(seed: int) -> random.Random:
    """`random.Random(seed)`, except that a negative seed gets a stream of its own: Python seeds an int by its
    absolute value, so -s would repeat the stream of s (a sweep over seeds -1 and 1, or `repeat` from a negative
    seed, would run one workload twice and call the copies replicates). Non-negative seeds are unchanged."""
    return random.Random(seed if seed >= 0 else f"asyncbatch.negative-seed.{seed}")


def _stop_ids(value: object) -> object:
    """Lists (any iterable but text) become tuples; anything else is kept as given, so that `validate` fails
    the one request that carries it instead of the constructor failing the whole call."""
    if isinstance(value, (str, bytes)):
        return value
    try:
        return tuple(value)  # type: ignore[arg-type]
    except TypeError:
        return value


@attrs.frozen
class SamplingParams:
    """How to pick each new token of one request.

    `temperature == 0` is greedy (argmax); `top_k == 0` and `top_p == 1` disable those filters. With a `seed`,
    sampling is reproducible whatever else shares the batch: the noise for token i of a request is a pure function
    of (seed, i, vocabulary index). Without one, the engine derives a seed from its own seed and the request id.

    The model's end-of-sequence tokens (its generation config) end a request with finish reason `stop`, as they
    end `generate()`; `ignore_eos` keeps generating past them (benchmarks of fixed output lengths).

    Validation is lazy on purpose: a bad value fails the one request that carries it (see `validate`), not the
    whole `generate` call. Valid values are those the engine's per-step tables hold: `temperature` 0 or in
    [1e-4, 1e4], `top_k` and `max_new_tokens` and stop token ids int32, `top_p` in (0, 1], `seed` 64 bits,
    `priority` an int64.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=_stop_ids)
    seed: int | None = None
    priority: int = 0
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise `RequestError` naming the first invalid field and its allowed range."""
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
    """One prompt to complete. `arrival_time` is seconds after the run starts (online workloads); 0 = at once.
    Like sampling values, it is checked per request (`validate_arrival`), not here."""

    request_id: str
    prompt_ids: tuple[int, ...] = attrs.field(converter=tuple)
    params: SamplingParams = SamplingParams()
    arrival_time: float = 0.0


@attrs.frozen
class TokenEvent:
    """One token delivered to the host, in order, for streaming consumers. A request that ends without a token
    (cancelled, or failed with an error) gets one last event with `token_id == -1` and its `finish_reason`."""

    request_id: str
    token_id: int
    index: int
    time: float
    finish_reason: FinishReason | None = None


@attrs.frozen
class Output:
    """The result of one request, returned in input order by `Engine.generate`.

    `token_times` holds one host timestamp (seconds since the run started) per generated token: the moment the
    host learned the token. `first_token_time - arrival_time` is the time to first token. `num_cached_tokens`:
    prompt tokens whose KV came from the prefix cache instead of being prefilled (summed over re-admissions after
    preemption; 0 with `engine.prefix_cache: none`).
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
    num_cached_tokens: int = 0

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
