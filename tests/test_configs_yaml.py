"""Every shipped experiment under configs/ loads (all sweep cells validated); each one this machine can run, runs,
shrunk with --set to a few requests of a few tokens. GPU-only files (llama3-8b, device cuda) are loaded, not run,
when CUDA is absent."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from asyncbatch.cli import main
from asyncbatch.core.config import ExperimentConfig, load_yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "simulate" not in load_yaml(p))  # experiments
EXPECTED = {"default.yaml", "sweep-buffers.yaml", "online.yaml", "sim-study.yaml", "llama3-8b.yaml"}


def test_the_shipped_configs_are_there():
    assert EXPECTED <= {p.name for p in CONFIGS}


def _needs_cuda(cfg: ExperimentConfig) -> bool:
    cells = [c for _, c in cfg.sweep_cells()]
    return any(c.engine.model.preset == "llama3-8b" or c.engine.model.device == "cuda"
               or c.engine.runtime.name == "cuda" for c in cells)


def _shrink(cfg: ExperimentConfig) -> list[str]:
    if cfg.workload.name == "synthetic":
        sets = ["workload.num_requests=3", "workload.prompt_len={dist: fixed, value: 6}",
                "workload.output_len={dist: fixed, value: 3}"]
    elif cfg.workload.name == "shared_prefix":
        sets = ["workload.num_prefixes=1", "workload.questions_per_prefix=3",
                "workload.prefix_len={dist: fixed, value: 4}", "workload.question_len={dist: fixed, value: 2}",
                "workload.output_len={dist: fixed, value: 3}"]
    elif cfg.workload.name == "conversation":
        sets = ["workload.num_conversations=1", "workload.turns=3", "workload.system_len={dist: fixed, value: 4}",
                "workload.user_len={dist: fixed, value: 2}", "workload.reply_len={dist: fixed, value: 2}",
                "workload.output_len={dist: fixed, value: 3}"]
    else:
        sets = ["workload.limit=3", "sampling.max_new_tokens=3"]
    sets.append("output.plots=false")  # plots are covered by test_sweep; matplotlib is slow to import
    return [x for s in sets for x in ("--set", s)]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads_and_runs(path, tmp_path, capsys):
    cfg = ExperimentConfig.from_yaml(path)
    assert cfg.name == path.stem
    # The resolved form loads back to the same experiment (what `run` writes as config.yaml).
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    if _needs_cuda(cfg) and not torch.cuda.is_available():
        pytest.skip(f"{path.name} needs a CUDA GPU (loaded and validated only)")
    out = tmp_path / "out"
    code = main(["--log-level", "warning", "run", str(path), *_shrink(cfg), "--out", str(out), "--no-progress"])
    capsys.readouterr()
    assert code == 0
    assert (out / "config.yaml").is_file() and (out / "environment.json").is_file()
    if cfg.sweep:
        with (out / "sweep.csv").open() as fh:
            assert len(list(csv.DictReader(fh))) == len(cfg.sweep_cells())
        results = sorted((out / "cells").glob("*/results.json"))
    else:
        results = [out / "results.json"]
    for r in results:
        summary = json.loads(r.read_text())["summary"]
        assert summary["num_requests"] == 3
        assert summary["finish_reasons"] == {"length": 3}
        assert summary["generated_tokens"] == 9


def test_gpu_benchmark_shape():
    cfg = ExperimentConfig.from_yaml(ROOT / "configs" / "llama3-8b.yaml")
    e, w = cfg.engine, cfg.workload.config
    assert (e.model.preset, e.model.dtype, e.model.device) == ("llama3-8b", "bfloat16", "cuda")
    assert e.batch.max_seqs == 32 and w.num_requests == 32
    assert (w.prompt_len.dist, w.prompt_len.value, w.output_len.dist, w.output_len.value) == ("fixed", 128,
                                                                                                "fixed", 1024)
    assert (e.buffers.name, e.streams.name, e.graphs.name) == ("double", "three", "mixed")
    assert cfg.sampling.ignore_eos  # fixed lengths: random weights may sample the EOS id


def test_sim_study_is_a_virtual_time_study():
    cfg = ExperimentConfig.from_yaml(ROOT / "configs" / "sim-study.yaml")
    rt = cfg.engine.runtime
    assert rt.name == "sim" and rt.config.order == "timed" and rt.config.check is False
    assert rt.config.cost.gpu_compute_ms == 28.0


def test_online_config_has_arrivals():
    cfg = ExperimentConfig.from_yaml(ROOT / "configs" / "online.yaml")
    assert cfg.workload.config.arrival.process == "poisson"
