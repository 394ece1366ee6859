"""The invariants `check_engine` asserts, as pure functions over one run's outputs, and the error that names them.

Torch-free and hypothesis-free, so that a failure can be explained (and these functions tested) on plain values.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from ..core.types import Output, SamplingParams
from .combos import FIELDS, spec_text

NO_RACE = "no race"
EVERY_REQUEST_ENDS = "every request ends"
FINISH_LIMITS = "finish limits"
REFERENCE_TOKENS = "reference tokens"
#: The invariants, in the order `check_engine` checks them.
INVARIANTS: tuple[str, ...] = (NO_RACE, EVERY_REQUEST_ENDS, FINISH_LIMITS, REFERENCE_TOKENS)

_SHOWN = 8  # conflicts or requests listed in a message; the rest are counted


class InvariantError(AssertionError):
    """An invariant does not hold. `invariant` is one of `INVARIANTS`, `combination` the engine's components and
    geometry as one line, `details` what was seen. `str()` holds all three."""

    def __init__(self, invariant: str, combination: str, details: str) -> None:
        self.invariant = invariant
        self.combination = combination
        self.details = details
        super().__init__(f"invariant '{invariant}' violated\n  engine: {combination}\n  {details}")


def describe(config: Mapping[str, Any]) -> str:
    """One line naming the components and geometry of an engine mapping (unset keys take the defaults)."""
    parts = [f"{f}={spec_text(config[f])}" for f in FIELDS if f in config]
    for key in ("batch", "cache"):
        sub = config.get(key) or {}
        parts.extend(f"{k}={v}" for k, v in sub.items())
    if "seed" in config:
        parts.append(f"seed={config['seed']}")
    return " ".join(parts) or "(defaults)"


def race_text(runtime: Any) -> str:
    """The happens-before checker's findings: `asyncbatch.core.races.race_report` where that module exists, else
    the first conflicts one per line."""
    try:
        from ..core.races import race_report  # noqa: PLC0415
    except ModuleNotFoundError as exc:  # an older asyncbatch: no richer report
        if exc.name != "asyncbatch.core.races":
            raise
    else:
        return str(race_report(runtime))
    conflicts = list(runtime.conflicts)
    lines = [str(c) for c in conflicts[:_SHOWN]]
    if len(conflicts) > _SHOWN:
        lines.append(f"... and {len(conflicts) - _SHOWN} more")
    return f"{len(conflicts)} unordered conflicting access(es):\n    " + "\n    ".join(lines)


def is_race_error(exc: BaseException) -> bool:
    """Whether `exc` is the `RaceError` a checked runtime raises when an op fails after a race (its message
    already is the race report)."""
    try:
        from ..core.races import RaceError  # noqa: PLC0415
    except ModuleNotFoundError as missing:  # an older asyncbatch: races are only in `runtime.conflicts`
        if missing.name != "asyncbatch.core.races":
            raise
        return False
    return isinstance(exc, RaceError)


def unended(outputs: Sequence[Output]) -> list[str]:
    """Requests that did not end with `length` or `stop` (an `error` here is a request the engine gave up on:
    the scheduler never scheduled it while nothing else ran)."""
    return [f"request {o.request_id!r} ended {o.finish_reason!r}" + (f": {o.error}" if o.error else "")
            for o in outputs if o.finish_reason not in ("length", "stop")]


def limit_violations(outputs: Sequence[Output], params: Sequence[SamplingParams], *, eos_ids: Collection[int],
                     max_len: int) -> list[str]:
    """What breaks the finish rules: at most `max_new_tokens` tokens; `stop` only on a stop id (or an EOS id
    unless `ignore_eos`) as the last token; `length` only at `max_new_tokens` or the engine's `max_len`; no stop id
    before the last token. One line per request at fault."""
    found = []
    for out, p in zip(outputs, params):
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
        toks, rid = out.token_ids, out.request_id
        early = next((i for i, t in enumerate(toks[:-1]) if t in stops), None)
        if len(toks) > p.max_new_tokens:
            found.append(f"request {rid!r}: {len(toks)} tokens, max_new_tokens={p.max_new_tokens}")
        elif early is not None:
            found.append(f"request {rid!r}: went on past stop token {toks[early]} at index {early}")
        elif out.finish_reason == "stop" and not (toks and toks[-1] in stops):
            found.append(f"request {rid!r}: ended 'stop' on {toks[-1:] or 'no token'}, stop ids {sorted(stops)}")
        elif out.finish_reason == "length" and toks and toks[-1] in stops:
            found.append(f"request {rid!r}: ended 'length' on stop token {toks[-1]}")
        elif out.finish_reason == "length" and len(toks) < p.max_new_tokens and len(out.prompt_ids) + len(
                toks) < max_len:
            found.append(f"request {rid!r}: ended 'length' after {len(toks)} of max_new_tokens="
                         f"{p.max_new_tokens}, below the context limit {max_len}")
    return found


def token_mismatches(outputs: Sequence[Output], params: Sequence[SamplingParams],
                     expected: Sequence[Sequence[int] | None]) -> list[str]:
    """Requests whose tokens differ from the reference's: greedy ones, and sampled ones with a seed (their
    sampling noise depends only on the seed and the token index). Unseeded sampled requests and `None` entries of
    `expected` are not compared."""
    found = []
    for out, p, exp in zip(outputs, params, expected):
        if exp is None or not (p.is_greedy or p.seed is not None):
            continue
        got, exp = tuple(out.token_ids), tuple(exp)
        if got != exp:
            at = next((i for i, (a, b) in enumerate(zip(got, exp)) if a != b), min(len(got), len(exp)))
            kind = "greedy" if p.is_greedy else f"sampled, seed {p.seed}"
            found.append(f"request {out.request_id!r} ({kind}): differs from token {at} on: "
                         f"expected {list(exp[at:at + 6])}, got {list(got[at:at + 6])} "
                         f"({len(exp)} vs {len(got)} tokens)")
    return found


def listing(lines: Sequence[str]) -> str:
    """Lines for a message: the first few, then a count of the rest."""
    shown = list(lines[:_SHOWN]) + ([f"... and {len(lines) - _SHOWN} more"] if len(lines) > _SHOWN else [])
    return "\n  ".join(shown)
