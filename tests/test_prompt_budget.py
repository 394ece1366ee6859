"""The prompt tokens a workload builds before the run are bounded (`workloads.MAX_PROMPT_TOKENS`).

Request counts were already capped, but not lengths: a conversation of 10^6 turns stayed under the request cap
while its prompts, each holding every earlier turn, grew to ~10^13 tokens, and a synthetic prompt of 2^31 - 1
tokens was drawn token by token. Both filled the memory before the run began. Now the request that would take the
total past the bound is refused, naming the key, before it is built; workloads within it are unchanged."""

from __future__ import annotations

import time

import pytest

from asyncbatch.cli import main
from asyncbatch.core.errors import ConfigError
from asyncbatch.core.types import SamplingParams
from asyncbatch.plugins import workloads
from asyncbatch.plugins.prefix_workloads import (
    Conversation,
    ConversationConfig,
    SharedPrefix,
    SharedPrefixConfig,
)
from asyncbatch.plugins.workloads import LengthDist, Synthetic, SyntheticConfig

FIXED = LengthDist(dist="fixed", value=1)


def _build(workload):
    return workload.requests(SamplingParams())


def _refusal(workload) -> tuple[str, float]:
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        _build(workload)
    return info.value.key, time.perf_counter() - start


def test_a_conversation_whose_prompts_grow_past_the_bound_is_refused_quickly():
    config = ConversationConfig(num_conversations=1, turns=10**6, system_len=FIXED, user_len=FIXED, reply_len=FIXED)

    key, seconds = _refusal(Conversation(config, vocab_size=100))

    assert "workload.turns" == key
    assert seconds < 30  # about 16,000 turns in, long before 10^6 turns' 10^12 tokens


def test_a_synthetic_prompt_near_int32s_limit_is_refused_before_it_is_drawn():
    config = SyntheticConfig(num_requests=1, prompt_len=LengthDist(dist="fixed", value=2**31 - 1))

    key, seconds = _refusal(Synthetic(config, vocab_size=100))

    assert ("workload.prompt_len", True) == (key, seconds < 1)


def test_shared_prefix_prompts_count_the_prefix_in_every_request(monkeypatch):
    monkeypatch.setattr(workloads, "MAX_PROMPT_TOKENS", 1_000)
    config = SharedPrefixConfig(num_prefixes=2, questions_per_prefix=10, prefix_len=LengthDist(value=40),
                                question_len=LengthDist(dist="fixed", value=10))
    assert 20 == len(_build(SharedPrefix(config, vocab_size=100)))  # 20 x 50 = 1,000 tokens: fits exactly

    bigger = SharedPrefixConfig(num_prefixes=2, questions_per_prefix=10, prefix_len=LengthDist(value=40),
                                question_len=LengthDist(dist="fixed", value=11))
    assert "workload.questions_per_prefix" == _refusal(SharedPrefix(bigger, vocab_size=100))[0]
    huge_prefix = SharedPrefixConfig(num_prefixes=1, prefix_len=LengthDist(value=1_001))
    assert "workload.prefix_len" == _refusal(SharedPrefix(huge_prefix, vocab_size=100))[0]


@pytest.mark.parametrize("slack, fits", [(0, True), (-1, False)])
def test_a_synthetic_workload_of_exactly_the_bound_fits(monkeypatch, slack, fits):
    monkeypatch.setattr(workloads, "MAX_PROMPT_TOKENS", 1_000 + slack)
    synthetic = Synthetic(SyntheticConfig(num_requests=10, prompt_len=LengthDist(value=100)), vocab_size=100)

    if fits:
        assert 1_000 == sum(len(r.prompt_ids) for r in _build(synthetic))
    else:
        assert "workload.prompt_len" == _refusal(synthetic)[0]


@pytest.mark.parametrize("slack, fits", [(0, True), (-1, False)])
def test_a_conversation_of_exactly_the_bound_fits(monkeypatch, slack, fits):
    # turn t holds the system prompt (10), t earlier user (5) + reply (5) pairs and its own message (5); the last
    # turn's reply is in no prompt, so it does not count
    total = 2 * sum(10 + 10 * t + 5 for t in range(10))
    monkeypatch.setattr(workloads, "MAX_PROMPT_TOKENS", total + slack)
    config = ConversationConfig(num_conversations=2, turns=10, system_len=LengthDist(value=10),
                                user_len=LengthDist(value=5), reply_len=LengthDist(value=5))
    conversation = Conversation(config, vocab_size=100)

    if fits:
        assert total == sum(len(r.prompt_ids) for r in _build(conversation))
    else:
        assert "workload.turns" == _refusal(conversation)[0]


def test_a_run_past_the_bound_exits_2_naming_the_key(tmp_path, capsys):
    code = main(["--log-level", "warning", "run", "--set",
                 "workload={name: conversation, num_conversations: 1, turns: 1000000, system_len: 1, user_len: 1, "
                 "reply_len: 1}", "--set", "output.plots=false", "--out", str(tmp_path / "run")])

    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (2, f"asyncbatch: config error: workload.turns: the workload's prompts add up to more than "
               f"{workloads.MAX_PROMPT_TOKENS:,} tokens (they are built before the run); make fewer or shorter "
               f"ones") == (code, err)
    assert not (tmp_path / "run" / "results.json").exists()
