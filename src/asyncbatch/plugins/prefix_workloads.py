"""Shared-prefix workloads, for prefix caching (`engine.prefix_cache`): requests whose prompts begin alike.

- `shared_prefix`: N system prompts × M questions; each request is one system prompt followed by its question.
- `conversation`: C conversations × T turns; turn t's prompt is the system prompt, every earlier turn (user message
  and assistant reply) and the new user message, so it starts with the whole prompt of turn t-1. The replies are
  synthetic token ids drawn up front: an offline workload cannot know what the model will answer.

Token ids are drawn below the model's vocabulary size from a seeded RNG: the same seed gives the same requests. The
contents come from one RNG stream, the order and the arrival times from others, so `order` and `arrival` change
when requests come, never what they hold. Both follow the workload protocol of `workloads.Synthetic`.
"""

from __future__ import annotations

import math
import random
from typing import Any, Literal

import attrs

from ..core.errors import ConfigError
from ..core.types import ARRIVAL_MAX_S, INT32_MAX, Request, SamplingParams, show
from .workloads import MAX_REQUESTS, Arrival, LengthDist, PromptBudget

ORDERS = ("grouped", "interleaved", "shuffled")


def _counts(owner: object, names: tuple[str, ...]) -> None:
    """Each named field is an int >= 1 (and int32); errors name `workload.<field>`."""
    for name in names:
        v = getattr(owner, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= INT32_MAX:
            raise ConfigError(f"workload.{name}", f"must be an int in [1, {INT32_MAX}], got {show(v)}")


def _total(owner: object, names: tuple[str, str]) -> None:
    """The product of the two named counts, the number of requests, is at most `MAX_REQUESTS` (the `synthetic`
    workload's bound): every request is built before the run, so more would only exhaust memory."""
    a, b = (getattr(owner, name) for name in names)
    if a * b > MAX_REQUESTS:
        raise ConfigError(f"workload.{names[1]}", f"{names[0]} x {names[1]} is the number of requests, which must be "
                                                  f"at most {MAX_REQUESTS} (the requests are built before the run), "
                                                  f"got {a} x {b} = {a * b}")


def _dists(owner: object, names: tuple[str, ...]) -> None:
    for name in names:
        if not isinstance(getattr(owner, name), LengthDist):
            raise ConfigError(f"workload.{name}", f"must be a length distribution (dist: fixed, uniform or "
                                                  f"lognormal), got {show(getattr(owner, name))}")


def _rngs(kind: str, seed: int) -> tuple[random.Random, random.Random, random.Random]:
    """Independent, reproducible streams for contents, order and arrival times (string seeds hash the same way
    in every process, whatever PYTHONHASHSEED says)."""
    return tuple(random.Random(f"asyncbatch.{kind}.{part}.{seed}")  # type: ignore[return-value]
                 for part in ("tokens", "order", "arrival"))


def _tokens(rng: random.Random, n: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(rng.randrange(vocab_size) for _ in range(n))


# ---------------------------------------------------------------- shared_prefix


@attrs.frozen
class SharedPrefixConfig:
    """`num_prefixes` system prompts of `prefix_len` tokens, each followed by `questions_per_prefix` questions of
    `question_len` tokens: num_prefixes × questions_per_prefix requests, each generating up to `output_len`
    tokens. `order`: `grouped` (every question of prefix 0, then prefix 1, ...), `interleaved` (round robin over
    the prefixes: question 0 of each, then question 1 of each, ...) or `shuffled` (a seeded permutation).
    Request ids are `p<prefix>-q<question>`; arrival times follow the order."""

    num_prefixes: int = 4
    questions_per_prefix: int = 16
    prefix_len: LengthDist = LengthDist(dist="fixed", value=200)
    question_len: LengthDist = LengthDist(dist="uniform", min=16, max=24)
    output_len: LengthDist = LengthDist(dist="fixed", value=16)
    order: Literal["grouped", "interleaved", "shuffled"] = "grouped"
    arrival: Arrival = Arrival()
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        _counts(self, ("num_prefixes", "questions_per_prefix"))
        _total(self, ("num_prefixes", "questions_per_prefix"))
        _dists(self, ("prefix_len", "question_len", "output_len"))
        if self.order not in ORDERS:
            raise ConfigError("workload.order", f"{show(self.order)} is not allowed", list(ORDERS))


class SharedPrefix:
    """N system prompts × M questions: every request starts with one of a few shared prefixes."""

    Config = SharedPrefixConfig

    def __init__(self, config: SharedPrefixConfig, *, vocab_size: int, seed: int = 0) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.seed = config.seed if config.seed is not None else seed

    def requests(self, sampling: SamplingParams, tokenizer: Any = None) -> list[Request]:
        c = self.config
        tokens, order_rng, arrival_rng = _rngs("shared_prefix", self.seed)
        budget = PromptBudget("workload.prefix_len")
        prefixes = []
        for _ in range(c.num_prefixes):
            n = c.prefix_len.draw(tokens)
            budget.take(n)
            prefixes.append(_tokens(tokens, n, self.vocab_size))
        budget = PromptBudget("workload.questions_per_prefix")  # each request holds its prefix and its question
        made: dict[tuple[int, int], tuple[tuple[int, ...], int]] = {}
        for p, prefix in enumerate(prefixes):
            for q in range(c.questions_per_prefix):
                n = c.question_len.draw(tokens)
                budget.take(len(prefix) + n)
                question = _tokens(tokens, n, self.vocab_size)
                made[p, q] = (prefix + question, c.output_len.draw(tokens))
        keys = sorted(made)  # grouped: (prefix, question)
        if c.order == "interleaved":
            keys.sort(key=lambda k: (k[1], k[0]))
        elif c.order == "shuffled":
            order_rng.shuffle(keys)
        times = c.arrival.times(len(keys), arrival_rng)
        out = []
        for (p, q), t in zip(keys, times, strict=True):
            prompt, max_new = made[p, q]
            out.append(Request(f"p{p}-q{q}", prompt, attrs.evolve(sampling, max_new_tokens=max_new), t))
        return out


# ---------------------------------------------------------------- conversation


@attrs.frozen
class ConversationConfig:
    """`num_conversations` chats of `turns` turns each. Turn t's prompt: a system prompt of `system_len` tokens,
    then for every earlier turn its user message (`user_len`) and a synthetic assistant reply (`reply_len`), then
    turn t's own user message; each turn generates up to `output_len` tokens. Request ids are `c<conv>-t<turn>`.

    Conversations start at the times of `arrival` (all at 0 when offline); turn t of a conversation arrives
    `t × turn_gap_s` seconds after its start (null: with turn 0). Requests come ordered by arrival time, then
    turn, then conversation, so a conversation's turns are always in order."""

    num_conversations: int = 8
    turns: int = 4
    system_len: LengthDist = LengthDist(dist="fixed", value=64)
    user_len: LengthDist = LengthDist(dist="uniform", min=8, max=32)
    reply_len: LengthDist = LengthDist(dist="uniform", min=16, max=64)
    output_len: LengthDist = LengthDist(dist="uniform", min=16, max=64)
    arrival: Arrival = Arrival()
    turn_gap_s: float | None = None
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        _counts(self, ("num_conversations", "turns"))
        _total(self, ("num_conversations", "turns"))
        _dists(self, ("system_len", "user_len", "reply_len", "output_len"))
        gap = self.turn_gap_s
        if gap is not None and (isinstance(gap, bool) or not isinstance(gap, (int, float))
                                or not math.isfinite(gap) or gap < 0):
            raise ConfigError("workload.turn_gap_s", f"must be a finite number of seconds >= 0 (or null), "
                                                     f"got {show(gap)}")


class Conversation:
    """Multi-turn chats: each turn's prompt extends the previous turn's prompt with a reply and a new message."""

    Config = ConversationConfig

    def __init__(self, config: ConversationConfig, *, vocab_size: int, seed: int = 0) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.seed = config.seed if config.seed is not None else seed

    def requests(self, sampling: SamplingParams, tokenizer: Any = None) -> list[Request]:
        c = self.config
        tokens, _, arrival_rng = _rngs("conversation", self.seed)
        starts = c.arrival.times(c.num_conversations, arrival_rng)
        gap = c.turn_gap_s or 0.0
        last = max(starts) + (c.turns - 1) * gap
        if not last <= ARRIVAL_MAX_S:
            raise ConfigError("workload.turn_gap_s", f"turns {c.turn_gap_s:g} s apart put the last turn "
                                                     f"{last:.3g} s after the start, past the limit of "
                                                     f"{ARRIVAL_MAX_S:g} s")
        made = []
        budget = PromptBudget("workload.turns")  # turn t's prompt holds every earlier turn: they grow with t
        for conv in range(c.num_conversations):
            n = c.system_len.draw(tokens)
            budget.check(n)  # counted in every turn's prompt below
            history = _tokens(tokens, n, self.vocab_size)
            for turn in range(c.turns):
                n = c.user_len.draw(tokens)
                budget.take(len(history) + n)
                user = _tokens(tokens, n, self.vocab_size)
                n = c.reply_len.draw(tokens)
                # Before building the reply: the next turn's prompt must fit; the last turn's reply, never in a
                # prompt, only the bound itself (it is still drawn and built, which keeps the seeds' workloads).
                if turn + 1 < c.turns:
                    budget.check(len(history) + len(user) + n)
                else:
                    budget.check(n, alone=True)
                reply = _tokens(tokens, n, self.vocab_size)
                params = attrs.evolve(sampling, max_new_tokens=c.output_len.draw(tokens))
                made.append((starts[conv] + turn * gap, turn, conv, history + user, params))
                history = history + user + reply
        made.sort(key=lambda m: m[:3])
        return [Request(f"c{conv}-t{turn}", prompt, params, t) for t, turn, conv, prompt, params in made]
