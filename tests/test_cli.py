"""The `asyncbatch` command line: run (results, reruns, traces), config errors, simulate. (`list`: test_list.py;
`compare`: test_compare.py; `--out`/`--force`, `repeat`: test_replicates.py.)

CPU only. Commands run in-process through `main(argv)` (one interpreter start instead of one per command); one
test goes through `python -m asyncbatch` to check the real exit code. Runs are shrunk with `--set`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from asyncbatch.cli import main
from asyncbatch.core.stats import percentile
from asyncbatch.plugins.trace import to_chrome_trace

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.yaml"
SMALL = ["--set", "workload.num_requests=8", "--set", "workload.prompt_len={dist: uniform, min: 4, max: 40}",
         "--set", "workload.output_len={dist: uniform, min: 3, max: 10}", "--no-progress"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--log-level", "warning", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The default experiment (no CONFIG: the embedded default), shrunk; shared by the tests that read it."""
    out = tmp_path_factory.mktemp("run") / "a"
    code = main(["--log-level", "warning", "run", *SMALL, "--out", str(out)])
    assert code == 0
    return out


# ---------------------------------------------------------------- run


def test_run_writes_consistent_results(first_run):
    for name in ("results.json", "config.yaml", "environment.json"):
        assert (first_run / name).is_file(), name
    res = json.loads((first_run / "results.json").read_text())
    s, outs, steps = res["summary"], res["outputs"], res["steps"]
    assert s["num_requests"] == len(outs) == 8
    assert s["generated_tokens"] == sum(o["output_tokens"] for o in outs)
    assert s["prompt_tokens"] == sum(o["prompt_tokens"] for o in outs)
    assert all(3 <= o["output_tokens"] <= 10 and 4 <= o["prompt_tokens"] <= 40 for o in outs)
    assert s["steps"] == len(steps) > 0
    reasons: dict[str, int] = {}
    for o in outs:
        reasons[o["finish_reason"]] = reasons.get(o["finish_reason"], 0) + 1
    assert s["finish_reasons"] == reasons == {"length": 8}
    assert s["ttft_p50"] == pytest.approx(percentile([o["ttft"] for o in outs], 50))
    assert s["e2e_p99"] == pytest.approx(percentile([o["latency"] for o in outs], 99))
    assert s["e2e_p90"] == pytest.approx(percentile([o["latency"] for o in outs], 90))
    assert s["ttft_mean"] == pytest.approx(sum(o["ttft"] for o in outs) / len(outs))
    assert s["ttft_p50"] <= s["ttft_p90"] <= s["ttft_p95"] <= s["ttft_p99"]
    # Every token's time, rounded to the microsecond: the latencies can be recomputed from the file alone.
    gaps = []
    for o in outs:
        times = o["token_times"]
        assert len(times) == o["output_tokens"]
        assert times == sorted(times) and all(round(t, 6) == t for t in times)
        assert o["ttft"] == pytest.approx(times[0] - o["arrival_time"], abs=2e-6)
        assert o["latency"] == pytest.approx(o["finish_time"] - o["arrival_time"], abs=2e-6)
        gaps += [b - a for a, b in zip(times, times[1:])]
    assert s["itl_p50"] == pytest.approx(percentile(gaps, 50), abs=2e-6)
    assert s["tokens_per_s"] == pytest.approx(s["generated_tokens"] / s["wall_s"])
    # Every token is sampled by some step: the steps' sampling rows cover the outputs.
    assert sum(st["num_tokens"] for st in steps) >= s["prompt_tokens"]
    env = json.loads((first_run / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 0 and env["runtime"] == "cpu"
    assert env["command"][:2] == ["asyncbatch", "--log-level"] and "run" in env["command"]
    assert env["device_name"]
    assert "asyncbatch.plugins.builtin" in env["plugins"]["loaded"]
    assert all(not any(w in k for w in ("TOKEN", "KEY", "SECRET", "PASSWORD")) for k in env["env"])


def test_saved_config_is_fully_resolved_and_reruns_identically(first_run, tmp_path, capsys):
    saved = yaml.safe_load((first_run / "config.yaml").read_text())
    assert saved["workload"]["num_requests"] == 8  # the --set values are baked in
    assert saved["engine"]["scheduler"] == {"name": "fifo", "chunked_prefill": True}  # defaults written out
    code, out, _ = _run(capsys, "run", str(first_run / "config.yaml"), "--out", str(tmp_path / "b"), "--no-progress")
    assert code == 0
    assert "generated tokens" in out
    ttft = next(line for line in out.splitlines() if line.startswith("TTFT ms p50 / p90 / p99 / mean"))
    summary = json.loads((tmp_path / "b" / "results.json").read_text())["summary"]
    shown = [f"{summary[f'ttft_{q}'] * 1e3:.2f}" for q in ("p50", "p90", "p99", "mean")]
    assert " / ".join(shown) == ttft.split("mean", 1)[1].strip()
    a = json.loads((first_run / "results.json").read_text())["outputs"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["outputs"]
    assert [o["output_tokens"] for o in a] == [o["output_tokens"] for o in b]
    assert [o["tokens_sha1"] for o in a] == [o["tokens_sha1"] for o in b]
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text()) == saved


def test_default_output_dir_is_name_and_timestamp(tmp_path, capsys):
    code, out, _ = _run(capsys, "run", str(DEFAULT), *SMALL, "--set", "workload.num_requests=2",
                        "--set", f"output.dir={tmp_path / 'res'}")
    assert code == 0
    (made,) = (tmp_path / "res").iterdir()
    assert made.name.startswith("default-") and (made / "results.json").is_file()
    assert str(made) in out


def _tracks(trace: dict) -> dict[str, int]:
    return {e["args"]["name"]: e["tid"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "thread_name"}


def _check_trace(trace: dict, streams: set[str], process: str) -> None:
    tracks = _tracks(trace)
    assert {"host", *streams} <= set(tracks)
    assert len(set(tracks.values())) == len(tracks)
    names = [e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"]
    assert names and process in names[0]
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    by_track = {t: [e for e in spans if e["tid"] == tid] for t, tid in tracks.items()}
    assert {e["name"] for e in by_track["host"]} >= {"prep", "upd"}
    assert any(e["name"] == "comp" for e in by_track["compute"])
    for e in spans:
        assert isinstance(e["ts"], float) and e["ts"] >= 0 and e["dur"] >= 0
        assert isinstance(e["args"]["batch"], int)
    assert max(e["args"]["batch"] for e in by_track["compute"]) >= 1


def test_trace_on_cpu_runtime_with_progress_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    path = tmp_path / "t" / "trace.json"
    code = main(["--log-level", "warning", "run", str(DEFAULT), *SMALL[:-1], "--set", "workload.num_requests=3",
                 "--out", str(tmp_path / "o"), "--trace", str(path)])
    _, err = capsys.readouterr()
    assert code == 0
    assert "tok" in err  # the tqdm bar drew on the (pretend) terminal
    _check_trace(json.loads(path.read_text()), {"h2d", "compute", "d2h"}, "cpu")


def test_trace_from_output_config_on_sim_runtime(tmp_path, capsys):
    code, out, _ = _run(capsys, "run", str(DEFAULT), *SMALL, "--set", "workload.num_requests=3",
                        "--set", "engine.runtime={name: sim, order: timed, check: false}",
                        "--set", "engine.streams=two", "--set", "output.trace=true", "--out", str(tmp_path / "o"))
    assert code == 0
    assert "virtual time" in out
    trace = json.loads((tmp_path / "o" / "trace.json").read_text())
    _check_trace(trace, {"copy", "compute"}, "sim")
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert 0 < res["summary"]["compute_busy_fraction"] <= 1


def test_to_chrome_trace_units_and_args():
    from asyncbatch.core.runtime.base import Span

    spans = [Span("compute", "comp", 0.002, 0.005, 3, {"tokens": 8, "dtype": torch.float32}),
             Span("host", "prep", 0.0, 0.001, 3)]
    trace = to_chrome_trace(spans, "p")
    x = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in x] == ["prep", "comp"]  # sorted by start
    comp = x[1]
    assert comp["ts"] == pytest.approx(2000.0) and comp["dur"] == pytest.approx(3000.0)
    assert comp["args"] == {"batch": 3, "tokens": 8, "dtype": "torch.float32"}
    assert _tracks(trace) == {"host": 0, "compute": 1}
    json.dumps(trace)


# ---------------------------------------------------------------- config errors


BAD = {
    "unknown key": ({"engine": {"bogus": 1}}, ["engine.bogus", "unknown key", "valid: ", "cache"]),
    "unknown top-level key": ({"engines": {}}, ["engines", "unknown key", "engine, name, output"]),
    "unknown component": ({"engine": {"scheduler": "nope"}}, ["engine.scheduler", "'nope'", "fifo, longest_prefix_first, prefill_first"]),
    "unknown component param": ({"engine": {"buffers": {"name": "n_slot", "slots": 3}}},
                                ["engine.buffers.slots", "num_slots"]),
    "wrong type": ({"workload": {"name": "synthetic", "num_requests": "many"}},
                   ["workload.num_requests", "expected an int"]),
    "bad literal": ({"engine": {"model": {"dtype": "fp8"}}}, ["engine.model.dtype", "bfloat16", "float32"]),
    "sweep over a missing key": ({"sweep": {"engine.nope": [1, 2]}}, ["sweep.engine.nope", "scheduler", "buffers"]),
    "sweep to a bad value": ({"sweep": {"engine.buffers": ["double", "quadruple"]}},
                             ["sweep cell", "quadruple", "n_slot"]),
}


@pytest.fixture
def no_model_builds(monkeypatch):
    import asyncbatch.core.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built for an invalid config")

    monkeypatch.setattr(models, "build_model", refuse)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_exits_2_before_building_a_model(case, tmp_path, capsys, no_model_builds):
    data, needles = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", **data}))
    code, out, err = _run(capsys, "run", str(path), "--out", str(tmp_path / "out"))
    assert code == 2
    assert err.startswith("asyncbatch: config error:")
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--set", "no_equals_sign"], "dotted.key=value"),
    (["--set", "engine.batch.max_seqs=0"], "max_seqs"),
    (["--set", "engine.graphs=cuda_magic"], "per_slot"),
    (["--set", "engine.prefix_cache=no"], "engine.prefix_cache: expected a component name or a mapping with 'name', "
                                          "got False (YAML reads on/off/yes/no as true/false) (valid: blocks, none, "
                                          "radix)"),
    (["--set", "workload.num_requests=99999999999999999999999"], "workload.num_requests: must be in [1, 16777216]"),
    (["--set", "engine.runtime={name: sim, cost: {gpu_compute_ms: -5}}"],
     "engine.runtime.cost.gpu_compute_ms: must be a finite number in [0, 3.6e+06] (milliseconds), got -5"),
    # past an hour per op, a run's virtual time overflowed into inf wall time and NaN latencies (results.json: NaN)
    (["--set", "engine.runtime={name: sim, cost: {gpu_compute_ms: 1e308}}"],
     "engine.runtime.cost.gpu_compute_ms: must be a finite number in [0, 3.6e+06] (milliseconds), got 1e+308"),
    (["--set", "engine.runtime={name: sim, host: measured, host_scale: 1e300}"],
     "engine.runtime.host_scale: must be a finite number in (0, 1e+06], got 1e+300"),
])
def test_bad_overrides_exit_2(argv, needle, tmp_path, capsys, no_model_builds):
    code, _, err = _run(capsys, "run", str(DEFAULT), *argv, "--out", str(tmp_path / "o"))
    assert code == 2 and needle in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--set", "engine.model.overrides={vocab_size: 0}"], "engine.model.overrides.vocab_size: expected an int >= 1, "
                                                          "got 0"),
    (["--set", "engine.cache.max_model_len=1"], "engine.cache.max_model_len: sequences of at most 1 tokens cannot hold "
                                                "a prompt token and a generated one"),
    (["--set", "engine.model.overrides={max_position_embeddings: 1}"], "engine.model: sequences of at most 1 tokens"),
])
def test_a_model_or_cache_that_cannot_serve_one_request_exits_2(argv, needle, tmp_path, capsys):
    """Found once the model's shape is known, but before anything runs: every request would fail otherwise."""
    code, _, err = _run(capsys, "run", str(DEFAULT), *argv, "--out", str(tmp_path / "o"))
    assert code == 2 and needle in err, err


def test_numbers_with_an_exponent_and_no_dot_are_numbers(tmp_path, capsys):
    """YAML 1.1 reads `1e-3` as a string; asyncbatch reads it as YAML 1.2 and JSON do, in files and in --set."""
    from asyncbatch.core.config import ExperimentConfig
    from asyncbatch.core.dotted import parse_value

    assert [0.001, -200000.0, 0.001, 123, ".5e"] == [parse_value(t) for t in ("1e-3", "-2E+5", "1.0e-3", "123",
                                                                              ".5e")]
    path = tmp_path / "e.yaml"
    path.write_text("name: e\nsampling: {temperature: 5e-1}\n")
    assert 0.5 == ExperimentConfig.from_yaml(path, overrides=[]).sampling.temperature
    assert 0.25 == ExperimentConfig.from_yaml(path, overrides=["sampling.temperature=25e-2"]).sampling.temperature


def test_missing_file_and_bad_yaml(tmp_path, capsys, no_model_builds):
    code, _, err = _run(capsys, "run", str(tmp_path / "nope.yaml"))
    assert code == 2 and "not found" in err
    (tmp_path / "broken.yaml").write_text("engine: [unclosed\n")
    code, _, err = _run(capsys, "run", str(tmp_path / "broken.yaml"))
    assert code == 2 and "not valid YAML" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_device_exits_1_and_leaves_no_directory(tmp_path, capsys):
    code, _, err = _run(capsys, "run", str(DEFAULT), "--set", "engine.model.device=cuda", "--out", str(tmp_path / "o"))
    assert code == 1 and "engine.model.device: 'cuda', but this machine has no CUDA device" in err
    assert not (tmp_path / "o").exists()


def test_module_entry_point_exit_code(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("engine:\n  scheduler: nope\n")
    proc = subprocess.run([sys.executable, "-m", "asyncbatch", "run", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "engine.scheduler" in proc.stderr and "fifo" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_usage_errors_return_2(capsys):
    assert main([]) == 2
    assert main(["run", "--bogus-flag"]) == 2
    assert main(["--version"]) == 0
    capsys.readouterr()

