"""Shared-prefix workloads (`shared_prefix`, `conversation`) and the prefix cache metrics of the run summary.

The generated requests have exactly the sharing structure each workload promises; configs fail naming the key;
both workloads run end to end on the tiny model (cpu runtime) and, without a prefix cache, save no prefill.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import yaml

from asyncbatch import ConfigError, ExperimentConfig
from asyncbatch.core.stats import RunSummary
from asyncbatch.core.types import Output, SamplingParams
from asyncbatch.plugins.experiment import run_experiment
from asyncbatch.plugins.prefix_workloads import (
    Conversation,
    ConversationConfig,
    SharedPrefix,
    SharedPrefixConfig,
)
from asyncbatch.plugins.report import summary_table
from asyncbatch.plugins.sweeps import METRIC_COLUMNS, summary_metrics, sweep_table
from asyncbatch.plugins.workloads import Arrival, LengthDist

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512
SAMPLING = SamplingParams(temperature=0.0)


def fixed(n: int) -> LengthDist:
    return LengthDist(dist="fixed", value=n)


def shared(seed: int = 0, **kw) -> list:
    base = {"num_prefixes": 3, "questions_per_prefix": 4, "prefix_len": fixed(20), "question_len": fixed(5),
            "output_len": fixed(7)}
    return SharedPrefix(SharedPrefixConfig(**{**base, **kw}), vocab_size=VOCAB, seed=seed).requests(SAMPLING)


def conversation(seed: int = 0, **kw) -> list:
    base = {"num_conversations": 3, "turns": 4, "system_len": fixed(10), "user_len": fixed(3), "reply_len": fixed(6),
            "output_len": fixed(5)}
    return Conversation(ConversationConfig(**{**base, **kw}), vocab_size=VOCAB, seed=seed).requests(SAMPLING)


def _pq(request_id: str) -> tuple[int, int]:
    p, q = request_id.split("-")
    return int(p[1:]), int(q[1:])


# ---------------------------------------------------------------- shared_prefix


def test_shared_prefix_structure():
    reqs = shared()
    assert [f"p{p}-q{q}" for p in range(3) for q in range(4)] == [r.request_id for r in reqs]
    assert [25] * 12 == [len(r.prompt_ids) for r in reqs]
    assert [7] * 12 == [r.params.max_new_tokens for r in reqs]
    assert [0.0] * 12 == [r.arrival_time for r in reqs]
    assert all(0 <= t < VOCAB for r in reqs for t in r.prompt_ids)
    prefixes = {p: reqs[4 * p].prompt_ids[:20] for p in range(3)}
    # Every request of prefix p starts with prefix p's tokens; the prefixes differ, and so do the questions.
    assert [prefixes[_pq(r.request_id)[0]] for r in reqs] == [r.prompt_ids[:20] for r in reqs]
    assert 3 == len(set(prefixes.values()))
    assert 12 == len({r.prompt_ids[20:] for r in reqs})
    # Sampling values other than max_new_tokens come from the experiment's defaults.
    assert [attrs.evolve(SAMPLING, max_new_tokens=7)] * 12 == [r.params for r in reqs]


def test_shared_prefix_with_length_distributions():
    reqs = shared(prefix_len=LengthDist(dist="uniform", min=10, max=30),
                  question_len=LengthDist(dist="uniform", min=2, max=6),
                  output_len=LengthDist(dist="uniform", min=1, max=9), questions_per_prefix=6)
    assert 18 == len(reqs)
    for p in range(3):
        group = [r.prompt_ids for r in reqs if r.request_id.startswith(f"p{p}-")]
        # The prefix is at least min long, so every prompt of the group agrees on the first 10 tokens; the
        # whole prompt is prefix + question.
        assert 1 == len({g[:10] for g in group})
        assert all(12 <= len(g) <= 36 for g in group)
    assert all(1 <= r.params.max_new_tokens <= 9 for r in reqs)
    assert len({r.params.max_new_tokens for r in reqs}) > 1


def test_shared_prefix_orders_are_permutations_of_the_same_requests():
    grouped, interleaved, shuffled = (shared(order=o) for o in ("grouped", "interleaved", "shuffled"))
    assert [f"p{p}-q{q}" for q in range(4) for p in range(3)] == [r.request_id for r in interleaved]
    assert sorted(r.request_id for r in grouped) == sorted(r.request_id for r in shuffled)
    assert [r.request_id for r in grouped] != [r.request_id for r in shuffled]
    by_id = {r.request_id: r for r in grouped}
    assert [by_id[r.request_id] for r in interleaved] == interleaved
    assert [by_id[r.request_id] for r in shuffled] == shuffled
    assert [r.request_id for r in shuffled] == [r.request_id for r in shared(order="shuffled")]


def test_shared_prefix_is_deterministic_per_seed():
    assert shared(seed=5) == shared(seed=5)
    assert [r.prompt_ids for r in shared(seed=5)] != [r.prompt_ids for r in shared(seed=6)]
    assert shared(seed=9) == _with_own_seed(9)


def _with_own_seed(own: int) -> list:
    """`workload.seed` wins over the experiment seed."""
    cfg = SharedPrefixConfig(num_prefixes=3, questions_per_prefix=4, prefix_len=fixed(20), question_len=fixed(5),
                             output_len=fixed(7), seed=own)
    return SharedPrefix(cfg, vocab_size=VOCAB, seed=123).requests(SAMPLING)


def test_shared_prefix_arrivals_follow_the_order():
    reqs = shared(order="shuffled", arrival=Arrival(process="poisson", rate=50.0))
    times = [r.arrival_time for r in reqs]
    assert sorted(times) == times and times[0] > 0 and len(set(times)) == 12
    # The arrival process does not change what the requests hold.
    assert [(r.request_id, r.prompt_ids) for r in shared(order="shuffled")] == [(r.request_id, r.prompt_ids)
                                                                                   for r in reqs]


# ---------------------------------------------------------------- conversation


def test_conversation_structure():
    reqs = conversation()
    # Offline: every turn at t=0, ordered turn by turn, so each conversation's turns come in order.
    assert [f"c{c}-t{t}" for t in range(4) for c in range(3)] == [r.request_id for r in reqs]
    by_id = {r.request_id: r.prompt_ids for r in reqs}
    for c in range(3):
        prompts = [by_id[f"c{c}-t{t}"] for t in range(4)]
        # system 10, then per earlier turn user 3 + reply 6, then the new user message 3
        assert [13, 22, 31, 40] == [len(p) for p in prompts]
        for t in range(1, 4):
            assert prompts[t - 1] == prompts[t][: len(prompts[t - 1])]
    assert 3 == len({by_id[f"c{c}-t0"][:10] for c in range(3)})  # each conversation has its own system prompt
    assert [5] * 12 == [r.params.max_new_tokens for r in reqs]
    assert [0.0] * 12 == [r.arrival_time for r in reqs]
    assert all(0 <= t < VOCAB for r in reqs for t in r.prompt_ids)


def test_conversation_turn_gaps_and_arrivals():
    reqs = conversation(arrival=Arrival(process="poisson", rate=20.0), turn_gap_s=0.5)
    times = [r.arrival_time for r in reqs]
    assert sorted(times) == times
    at = {r.request_id: r.arrival_time for r in reqs}
    for c in range(3):
        assert [pytest.approx(at[f"c{c}-t0"] + 0.5 * t) for t in range(4)] == [at[f"c{c}-t{t}"] for t in range(4)]
        turns = [int(r.request_id.split("-t")[1]) for r in reqs if r.request_id.startswith(f"c{c}-")]
        assert [0, 1, 2, 3] == turns
    # Gaps without an arrival process: conversations start at 0, turn t at t * gap.
    assert [0.25 * t for t in range(4) for _ in range(3)] == [r.arrival_time for r in conversation(turn_gap_s=0.25)]
    # Same contents whatever the arrivals.
    assert sorted((r.request_id, r.prompt_ids) for r in conversation()) == sorted((r.request_id, r.prompt_ids)
                                                                                 for r in reqs)


def test_conversation_is_deterministic_per_seed():
    assert conversation(seed=3) == conversation(seed=3)
    assert [r.prompt_ids for r in conversation(seed=3)] != [r.prompt_ids for r in conversation(seed=4)]


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("workload, message", [
    ({"name": "shared_prefix", "num_prefixes": 0}, "workload.num_prefixes: must be an int in [1, 2147483647], got 0"),
    ({"name": "shared_prefix", "questions_per_prefix": -1},
     "workload.questions_per_prefix: must be an int in [1, 2147483647], got -1"),
    ({"name": "shared_prefix", "order": "random"},
     "workload.order: 'random' is not allowed (valid: grouped, interleaved, shuffled)"),
    ({"name": "shared_prefix", "prefix_len": {"dist": "fixed", "value": 0}},
     "workload.prefix_len.value: must be in [1, 2147483647], got 0"),
    ({"name": "shared_prefix", "question_len": {"dist": "uniform", "min": 5, "max": 2}},
     "workload.question_len.max: must be >= min (5), got 2"),
    ({"name": "shared_prefix", "arrival": {"process": "poisson", "rate": 0}},
     "workload.arrival.rate: must be > 0 for poisson arrivals, got 0.0"),
    ({"name": "shared_prefix", "nope": 1},
     "workload.nope: unknown key (valid: arrival, num_prefixes, order, output_len, prefix_len, question_len, "
     "questions_per_prefix, seed)"),
    ({"name": "conversation", "num_conversations": 0},
     "workload.num_conversations: must be an int in [1, 2147483647], got 0"),
    ({"name": "conversation", "turns": 0}, "workload.turns: must be an int in [1, 2147483647], got 0"),
    ({"name": "conversation", "turn_gap_s": -1},
     "workload.turn_gap_s: must be a finite number of seconds >= 0 (or null), got -1.0"),
    ({"name": "conversation", "reply_len": {"dist": "lognormal", "sigma": -1}},
     "workload.reply_len.sigma: lognormal needs sigma >= 0, got -1.0"),
    ({"name": "conversation", "turns": "two"}, "workload.turns: expected an int, got str 'two'"),
])
def test_config_errors_name_the_key(workload, message):
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict({"workload": workload})
    assert message == str(e.value)


def test_python_configs_are_checked_too():
    with pytest.raises(ConfigError) as e:
        SharedPrefixConfig(order="sideways")
    assert "workload.order: 'sideways' is not allowed (valid: grouped, interleaved, shuffled)" == str(e.value)
    with pytest.raises(ConfigError) as e:
        ConversationConfig(turn_gap_s=float("inf"))
    assert "workload.turn_gap_s: must be a finite number of seconds >= 0 (or null), got inf" == str(e.value)


def test_the_shipped_config():
    data = yaml.safe_load((ROOT / "configs" / "prefix-sharing.yaml").read_text())
    assert {"engine.prefix_cache": ["none", "blocks", "radix"]} == data["sweep"]
    data.pop("sweep")  # loads only once `engine.prefix_cache` exists (test_configs_yaml runs the whole file)
    w = ExperimentConfig.from_dict(data).workload
    assert ("shared_prefix", 4, 16, fixed(200), 16) == (w.name, w.config.num_prefixes, w.config.questions_per_prefix,
                                                        w.config.prefix_len, w.config.output_len.value)


def test_set_and_sweep_choose_the_workload(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"workload": {"name": "synthetic", "output_len": {"dist": "fixed", "value": 3}}}))
    cfg = ExperimentConfig.from_yaml(path, overrides=["workload.name=shared_prefix", "workload.num_prefixes=2"])
    assert ("shared_prefix", 2, fixed(3)) == (cfg.workload.name, cfg.workload.config.num_prefixes,
                                             cfg.workload.config.output_len)
    # A synthetic-only key (num_requests) does not carry over: replace the whole section instead.
    cfg = ExperimentConfig.from_yaml(ROOT / "configs" / "default.yaml", overrides=["workload=conversation"])
    assert ("conversation", ConversationConfig()) == (cfg.workload.name, cfg.workload.config)
    # Sweeps vary a workload's keys (`workload.order`, below), or the whole section from one workload to another.
    cfg = ExperimentConfig.from_dict({"sweep": {"workload": [{"name": "shared_prefix", "num_prefixes": 2},
                                                             {"name": "conversation", "turns": 3}, "synthetic"]}})
    assert [("shared_prefix", 2), ("conversation", 3), ("synthetic", 64)] == [
        (c.workload.name, getattr(c.workload.config, {"shared_prefix": "num_prefixes", "conversation": "turns",
                                                      "synthetic": "num_requests"}[c.workload.name]))
        for _, c in cfg.sweep_cells()]


# ---------------------------------------------------------------- end to end, no prefix cache

BASE = {"engine": {"model": {"preset": "tiny", "dtype": "float32", "device": "cpu"}, "runtime": "cpu",
                   "cache": {"block_size": 4, "num_blocks": 128}, "batch": {"max_tokens": 64, "max_seqs": 8},
                   "graphs": "eager"},
        "sampling": {"ignore_eos": True}, "output": {"plots": False, "progress": False}}


def _run(tmp_path: Path, workload: dict, sweep: dict | None = None):
    cfg = ExperimentConfig.from_dict({**BASE, "workload": workload, **({"sweep": sweep} if sweep else {})})
    return run_experiment(cfg, tmp_path / "out", progress=False, echo=lambda _: None)


def test_shared_prefix_runs_end_to_end(tmp_path):
    workload = {"name": "shared_prefix", "num_prefixes": 2, "questions_per_prefix": 3,
                "prefix_len": {"dist": "fixed", "value": 9}, "question_len": {"dist": "fixed", "value": 2},
                "output_len": {"dist": "fixed", "value": 3}}
    result = _run(tmp_path, workload, sweep={"workload.order": ["grouped", "interleaved"]})
    assert 2 == len(result)
    for cell in result:
        s = cell.summary
        assert (6, 66, 18, {"length": 6}) == (s.num_requests, s.prompt_tokens, s.generated_tokens, s.finish_reasons)
        assert (0, 0.0) == (s.prefill_tokens_saved, s.prefix_cache_hit_rate)
        records = json.loads((cell.out_dir / "results.json").read_text())["outputs"]
        assert [0] * 6 == [r["cached_tokens"] for r in records]
    assert [["p0-q0", "p0-q1", "p0-q2", "p1-q0", "p1-q1", "p1-q2"], ["p0-q0", "p1-q0", "p0-q1", "p1-q1", "p0-q2",
                                                                       "p1-q2"]] == [
        [r["request_id"] for r in json.loads((c.out_dir / "results.json").read_text())["outputs"]] for c in result]
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())["rows"]
    assert [(0.0, 0)] * 2 == [(r["prefix_cache_hit_rate"], r["prefill_tokens_saved"]) for r in rows]


def test_conversation_runs_end_to_end(tmp_path):
    workload = {"name": "conversation", "num_conversations": 2, "turns": 3, "system_len": {"dist": "fixed", "value": 5},
                "user_len": {"dist": "fixed", "value": 2}, "reply_len": {"dist": "fixed", "value": 3},
                "output_len": {"dist": "fixed", "value": 2}}
    (cell,) = _run(tmp_path, workload)
    s = cell.summary
    # prompts: 7, 12, 17 per conversation
    assert (6, 72, 12, {"length": 6}) == (s.num_requests, s.prompt_tokens, s.generated_tokens, s.finish_reasons)
    assert (0, 0.0) == (s.prefill_tokens_saved, s.prefix_cache_hit_rate)
    records = json.loads((cell.out_dir / "results.json").read_text())["outputs"]
    assert ["c0-t0", "c1-t0", "c0-t1", "c1-t1", "c0-t2", "c1-t2"] == [r["request_id"] for r in records]
    assert [7, 7, 12, 12, 17, 17] == [r["prompt_tokens"] for r in records]
    assert "prefix cache" not in summary_table(s, cell.runtime)  # no cache, nothing read from one


def test_a_prefix_cache_saves_the_shared_blocks(tmp_path):
    from asyncbatch.core.config import EngineConfig

    if not hasattr(EngineConfig(), "prefix_cache"):
        pytest.skip("engine.prefix_cache is not there yet")
    # One request at a time, blocks of 4: the 9-token prefix is 2 full blocks (8 tokens); the first question of
    # each prefix misses, the two after it read those 8 tokens from the cache.
    workload = {"name": "shared_prefix", "num_prefixes": 2, "questions_per_prefix": 3,
                "prefix_len": {"dist": "fixed", "value": 9}, "question_len": {"dist": "fixed", "value": 2},
                "output_len": {"dist": "fixed", "value": 3}}
    data = {**BASE, "engine": {**BASE["engine"], "batch": {"max_tokens": 64, "max_seqs": 1}}, "workload": workload}
    (cell,) = run_experiment(ExperimentConfig.from_dict({**data, "engine": {**data["engine"], "prefix_cache": "blocks"}}),
                             tmp_path / "out", progress=False, echo=lambda _: None)
    records = json.loads((cell.out_dir / "results.json").read_text())["outputs"]
    assert [0, 8, 8, 0, 8, 8] == [r["cached_tokens"] for r in records]
    assert (32, 32 / 66) == (cell.summary.prefill_tokens_saved, cell.summary.prefix_cache_hit_rate)
    assert "prefix cache hit rate           0.485 (32 prefill tokens saved)" in summary_table(cell.summary, "cpu")


# ---------------------------------------------------------------- the metrics


def _out(prompt: int, cached: int, reason: str = "length") -> Output:
    return Output(f"r{prompt}-{cached}", tuple(range(prompt)), (1, 2), reason, num_cached_tokens=cached)


def _summary(outputs: list[Output]) -> RunSummary:
    return RunSummary.build(outputs, [], 1.0, busy_fraction=None, preemptions=0)


def test_summary_prefix_cache_math():
    s = _summary([_out(10, 5), _out(20, 10), _out(30, 0, "error"), _out(40, 0, "cancelled")])
    assert (15, 15 / 70) == (s.prefill_tokens_saved, s.prefix_cache_hit_rate)
    s = _summary([_out(16, 16), _out(48, 32)])
    assert (48, 0.75) == (s.prefill_tokens_saved, s.prefix_cache_hit_rate)
    assert (0, 0.0) == (_summary([_out(8, 0)]).prefill_tokens_saved, _summary([_out(8, 0)]).prefix_cache_hit_rate)
    assert (0, None) == (_summary([]).prefill_tokens_saved, _summary([]).prefix_cache_hit_rate)
    only_errors = _summary([_out(8, 0, "error")])
    assert (0, None) == (only_errors.prefill_tokens_saved, only_errors.prefix_cache_hit_rate)
    metrics = summary_metrics(attrs.asdict(_summary([_out(16, 16), _out(48, 32)])))
    assert (0.75, 48) == (metrics["prefix_cache_hit_rate"], metrics["prefill_tokens_saved"])
    assert {"prefix_cache_hit_rate", "prefill_tokens_saved"} <= set(METRIC_COLUMNS)
    assert (None, None) == tuple(summary_metrics({}).get(k) for k in ("prefix_cache_hit_rate", "prefill_tokens_saved"))


def test_the_report_shows_the_cache_when_it_matters():
    hit = _summary([_out(16, 16), _out(48, 32)])
    miss = _summary([_out(16, 0)])
    line = [x for x in summary_table(hit, "cpu").splitlines() if x.startswith("prefix cache hit rate")]
    assert ["prefix cache hit rate           0.750 (48 prefill tokens saved)"] == line
    assert "prefix cache" not in summary_table(miss, "cpu")
    assert "prefix cache hit rate           0.000 (0 prefill tokens saved)" in summary_table(miss, "cpu",
                                                                                             prefix_cache=True)
    rows = [{"engine.prefix_cache": name, "rep": 0, **dict.fromkeys(METRIC_COLUMNS),
             **summary_metrics(attrs.asdict(s))} for name, s in (("none", miss), ("radix", hit))]
    table = sweep_table(["engine.prefix_cache"], rows)
    assert "cache hit" in table.splitlines()[0] and "0.750" in table.splitlines()[-2]
    assert "cache hit" not in sweep_table(["workload.order"], [{**rows[0], "workload.order": "grouped"}])
