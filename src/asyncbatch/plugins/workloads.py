"""Built-in workloads: synthetic prompt/output lengths, or prompts from a JSONL file; offline or Poisson arrivals.

A workload is built as ``Workload(config, vocab_size=..., seed=...)`` and turns the experiment's default sampling
parameters into requests with ``requests(sampling, tokenizer=None)``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Literal

import attrs

from ..core.errors import ConfigError
from ..core.types import ARRIVAL_MAX_S, INT32_MAX, Request, SamplingParams, seeded_random, show


def _finite(owner: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(name, f"must be a finite number, got {value}")


@attrs.frozen
class LengthDist:
    """A token-length distribution: `fixed` (value), `uniform` (min..max), `lognormal` (`mean` or `median`, not
    both; a mean of 64 with neither; and sigma of the underlying normal; clipped to min..max). Lengths are at most
    2**31 - 1 (int32). A field that the chosen `dist` does not read (`value` beside `dist: uniform`) is refused
    unless it holds its default, what a config.yaml saved by an older version wrote; the saved form holds `dist`
    and the fields it reads."""

    # Not fields: `mean` stays None when left out, so that giving it with `median` is seen (and refused).
    default_mean = 64.0
    #: The fields each distribution reads; any other field would be silently ignored, so it is refused.
    reads = {"fixed": ("value",), "uniform": ("min", "max"), "lognormal": ("mean", "median", "sigma", "min", "max")}

    dist: Literal["fixed", "uniform", "lognormal"] = "fixed"
    value: int = 32
    min: int = 1
    max: int = 1024
    mean: float | None = None
    sigma: float = 0.5
    median: float | None = None

    @classmethod
    def __structure_scalar__(cls, value: object) -> LengthDist:
        """YAML's short form of a fixed length: `output_len: 64` is `{dist: fixed, value: 64}`."""
        if not isinstance(value, int):
            raise ConfigError("", f"expected a length (an int, for a fixed one) or a mapping of LengthDist fields, "
                                  f"got {type(value).__name__} {show(value)}")
        return cls(dist="fixed", value=value)

    def __unstructure__(self) -> dict[str, object]:
        """The YAML form: `dist` and the fields it reads (an unset mean or median left out)."""
        return {"dist": self.dist, **{name: getattr(self, name) for name in self.reads.get(self.dist, ())
                                      if getattr(self, name) is not None}}

    def __attrs_post_init__(self) -> None:
        # Errors name the field; structuring prefixes the path (`workload.prompt_len.min`).
        reads = self.reads.get(self.dist)
        for field in attrs.fields(LengthDist) if reads is not None else ():
            if field.name != "dist" and field.name not in reads and getattr(self, field.name) != field.default:
                which = next(d for d, names in self.reads.items() if field.name in names)
                raise ConfigError(field.name, f"`dist: {self.dist}` does not read {field.name} (it reads "
                                              f"{', '.join(reads)}), so {show(getattr(self, field.name))} would "
                                              f"be silently ignored: remove it, or use the dist that reads it "
                                              f"(`dist: {which}`)")
        for name in ("value", "min", "max"):
            v = getattr(self, name)
            if not 1 <= v <= INT32_MAX:
                raise ConfigError(name, f"must be in [1, {INT32_MAX}], got {show(v)}")
        if self.max < self.min:
            raise ConfigError("max", f"must be >= min ({self.min}), got {self.max}")
        _finite(self, ("mean", "sigma", "median"))
        if self.dist == "lognormal":
            if self.mean is not None and self.median is not None:
                saved = " (a config.yaml saved by an older version wrote its default mean: 64 beside a median: " \
                        "remove the mean)" if self.mean == self.default_mean else ""
                raise ConfigError("", f"lognormal takes `mean` or `median`, not both (got mean {self.mean:g} "
                                      f"and median {self.median:g}): give one of them{saved}")
            if self.median is not None and self.median <= 0:
                raise ConfigError("median", f"lognormal needs median > 0, got {self.median}")
            if self.median is None and self.mean is not None and self.mean <= 0:
                raise ConfigError("mean", f"lognormal needs mean > 0 (or median > 0), got {self.mean}")
            if self.sigma < 0:
                raise ConfigError("sigma", f"lognormal needs sigma >= 0, got {self.sigma}")

    def draw(self, rng: random.Random) -> int:
        if self.dist == "fixed":
            return self.value
        if self.dist == "uniform":
            return rng.randint(self.min, self.max)
        # mu is the log of the median; from a mean, shift it so that the mean is `mean`. Done in log space and
        # clipped there, so that extreme parameters give min or max instead of overflowing exp() (the same
        # draws as `rng.lognormvariate(mu, sigma)` otherwise).
        mean = self.mean if self.mean is not None else self.default_mean
        mu = math.log(self.median) if self.median is not None else math.log(mean) - self.sigma * self.sigma / 2
        x = mu + rng.normalvariate(0.0, 1.0) * self.sigma
        lo, hi = math.log(self.min) - 1.0, math.log(self.max) + 1.0
        x = lo if math.isnan(x) else min(max(x, lo), hi)  # NaN: -inf + inf, a huge sigma's mean shift won
        return max(self.min, min(self.max, round(math.exp(x))))


@attrs.frozen
class Arrival:
    """`offline`: every request at t=0. `poisson`: exponential gaps at `rate` requests per second. Every arrival
    must come within `ARRIVAL_MAX_S` seconds of the start: a rate so low that one would not is a config error."""

    process: Literal["offline", "poisson"] = "offline"
    rate: float = 10.0

    def __attrs_post_init__(self) -> None:
        if not math.isfinite(self.rate):
            raise ConfigError("arrival.rate", f"must be a finite number, got {self.rate}")
        if self.process == "poisson" and self.rate <= 0:
            raise ConfigError("arrival.rate", f"must be > 0 for poisson arrivals, got {self.rate}")

    def times(self, n: int, rng: random.Random) -> list[float]:
        if self.process == "offline":
            return [0.0] * n
        t, out = 0.0, []
        for _ in range(n):
            t += rng.expovariate(self.rate)
            out.append(t)
        if out and not out[-1] <= ARRIVAL_MAX_S:  # inf too (a gap of 1/rate past float64)
            raise ConfigError("workload.arrival.rate", f"{self.rate:g} requests per second is too low: request "
                                                       f"{n - 1} would arrive {out[-1]:.3g} s after the start, past "
                                                       f"the limit of {ARRIVAL_MAX_S:g} s")
        return out


MAX_REQUESTS = 1 << 24
MAX_PROMPT_TOKENS = 1 << 28  # prompt tokens a workload builds before the run, all requests together (~2 GiB of ids)


class PromptBudget:
    """Counts the prompt tokens a workload builds, and refuses (naming `key`) the request that would take the total
    past `MAX_PROMPT_TOKENS`, before building it: lengths drawn near int32's limit, or a conversation whose
    prompts grow with every turn, would otherwise fill the memory before the run starts."""

    def __init__(self, key: str) -> None:
        self.key, self.used = key, 0

    def take(self, n: int) -> None:
        self.check(n)
        self.used += n

    def check(self, n: int, *, alone: bool = False) -> None:
        """Refuse now if `n` more tokens would not fit (without counting them); `alone`: if `n` tokens would not
        fit even in an empty budget."""
        if (0 if alone else self.used) + n > MAX_PROMPT_TOKENS:
            raise ConfigError(self.key, f"the workload's prompts add up to more than {MAX_PROMPT_TOKENS:,} tokens "
                                        f"(they are built before the run); make fewer or shorter ones")


@attrs.frozen
class SyntheticConfig:
    """Random prompts of `prompt_len` tokens; each request generates up to `output_len` tokens."""

    num_requests: int = 64
    prompt_len: LengthDist = LengthDist(dist="uniform", min=16, max=128)
    output_len: LengthDist = LengthDist(dist="uniform", min=16, max=64)
    arrival: Arrival = Arrival()
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.num_requests <= MAX_REQUESTS:
            raise ConfigError("workload.num_requests", f"must be in [1, {MAX_REQUESTS}] (the requests are built "
                                                       f"before the run), got {show(self.num_requests)}")


class Synthetic:
    """Random token prompts with lengths from distributions; offline or Poisson arrivals."""

    Config = SyntheticConfig

    def __init__(self, config: SyntheticConfig, *, vocab_size: int, seed: int = 0) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.seed = config.seed if config.seed is not None else seed

    def requests(self, sampling: SamplingParams, tokenizer: Any = None) -> list[Request]:
        c = self.config
        rng = seeded_random(self.seed)
        times = c.arrival.times(c.num_requests, rng)
        out = []
        budget = PromptBudget("workload.prompt_len")
        for i in range(c.num_requests):
            n = c.prompt_len.draw(rng)
            budget.take(n)
            prompt = [rng.randrange(self.vocab_size) for _ in range(n)]
            params = attrs.evolve(sampling, max_new_tokens=c.output_len.draw(rng))
            out.append(Request(f"req-{i}", tuple(prompt), params, times[i]))
        return out


@attrs.frozen
class JsonlConfig:
    """One JSON object per line: `{"prompt": "text"}` (needs a tokenizer) or `{"prompt_ids": [1, 2, 3]}`, with
    optional `max_new_tokens` and `id` (a null id is none: `req-<n>` for the n-th row). UTF-8, a leading BOM
    allowed. `limit`: use at most this many lines."""

    path: str = "prompts.jsonl"
    arrival: Arrival = Arrival()
    limit: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError("workload.limit", f"must be >= 1 (or null: every line), got {show(self.limit)}")


class JsonlPrompts:
    """Prompts read from a JSONL file (text or token ids); offline or Poisson arrivals."""

    Config = JsonlConfig

    def __init__(self, config: JsonlConfig, *, vocab_size: int, seed: int = 0) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.seed = seed

    def requests(self, sampling: SamplingParams, tokenizer: Any = None) -> list[Request]:
        rows = self._rows()
        times = self.config.arrival.times(len(rows), seeded_random(self.seed))
        out = []
        lines: dict[str, str] = {}  # request id -> where it was given, to name both lines of a duplicate
        for i, (where, row) in enumerate(rows):
            if "prompt_ids" in row:
                if not isinstance(row["prompt_ids"], list):
                    raise ConfigError("workload.path", f"{where}: prompt_ids must be a list of token ids, got "
                                                       f"{show(row['prompt_ids'])}")
                prompt = tuple(row["prompt_ids"])
            elif "prompt" in row:
                if not isinstance(row["prompt"], str):
                    raise ConfigError("workload.path", f"{where}: prompt must be a string, got {show(row['prompt'])}")
                if tokenizer is None:
                    raise ConfigError("workload.path", f"{self.config.path} has text prompts but the model has no "
                                                       "tokenizer (set engine.model.tokenizer, or use prompt_ids)")
                prompt = tuple(tokenizer.encode(row["prompt"]))
            else:
                raise ConfigError("workload.path", f"{where}: needs 'prompt' or 'prompt_ids'")
            params = sampling
            if "max_new_tokens" in row:  # a bad value fails this request alone, as any bad request value does
                params = attrs.evolve(sampling, max_new_tokens=row["max_new_tokens"])
            rid = row.get("id")  # null is no id, as in JSON APIs: not the request "None"
            rid = f"req-{i}" if rid is None else str(rid)
            if rid in lines:  # results are keyed by id; say where, not only which workload (a row without an
                # id is `req-<n>`, which an explicit id can also be)
                raise ConfigError("workload.path", f"{where}: request id {rid!r} is also the id of {lines[rid]} "
                                                   f"(ids must be distinct; a row without one is named req-<n>, n counting rows from 0)")
            lines[rid] = where
            out.append(Request(rid, prompt, params, times[i]))
        return out

    def _rows(self) -> list[tuple[str, dict]]:
        """The file's JSON objects (at most `limit`), each with where it is (`path:line`)."""
        path = Path(self.config.path)
        if not path.is_file():
            raise ConfigError("workload.path", f"no such file: {path}")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM that editors on Windows write
        except UnicodeDecodeError as exc:
            raise ConfigError("workload.path", f"{path} is not UTF-8 text: {exc}") from None
        rows: list[tuple[str, dict]] = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise ConfigError("workload.path", f"{path}:{lineno} is not valid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise ConfigError("workload.path", f"{path}:{lineno}: expected a JSON object, got "
                                                   f"{type(row).__name__}")
            rows.append((f"{path}:{lineno}", row))
            if self.config.limit is not None and len(rows) >= self.config.limit:
                break
        if not rows:  # a run of no requests would "succeed" with nothing measured
            raise ConfigError("workload.path", f"{path} holds no prompts")
        return rows


def checked_requests(requests: Any, workload: str) -> list[Request]:
    """What a workload returned, as the engine needs it: a list of `Request`s with distinct ids (results are keyed
    by id). A plugin workload is named when it breaks that; bad values inside a request fail that request alone."""
    if not isinstance(requests, (list, tuple)) or not all(isinstance(r, Request) for r in requests):
        got = type(requests).__name__ if not isinstance(requests, (list, tuple)) else \
            next(type(r).__name__ for r in requests if not isinstance(r, Request))
        raise ConfigError("workload", f"workload {workload!r} must return a list of asyncbatch Requests, got {got}")
    if not requests:  # a run of nothing would "succeed" (exit 0) with nothing measured
        raise ConfigError("workload", f"workload {workload!r} made no requests: a run needs at least one")
    seen: set[str] = set()
    for r in requests:
        if r.request_id in seen:
            raise ConfigError("workload", f"workload {workload!r} returned request id {r.request_id!r} more than once")
        seen.add(r.request_id)
    return list(requests)
