"""The prompts of `asyncbatch bench-serve`: from an experiment file's `workload` section (the project's workload
generators: synthetic lengths as token ids), from a JSONL dataset (text or token ids), or the default synthetic
workload.

`bench.main` calls `load_requests` once, before it contacts the server, so a bad file fails at once; every
request rate of a sweep then sends the same prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from ..core.config import ComponentSpec, ExperimentConfig
from ..core.errors import ConfigError
from ..core.plugin_host import get_plugin_host
from ..core.types import SamplingParams
from ..plugins.workloads import SyntheticConfig
from .bench_client import BenchRequest


@attrs.frozen
class Prompts:
    """What to send: the requests, the temperature of the experiment's `sampling` section (greedy without), and
    the seed in effect (`--seed`, else the file's), which also seeds the arrival times."""

    requests: tuple[BenchRequest, ...]
    temperature: float = 0.0
    source: str = "synthetic"
    seed: int = 0


def load_requests(workload: str | None = None, dataset: str | None = None, *, num_requests: int | None = None,
                  seed: int | None = None, vocab_size: int = 512) -> Prompts:
    """`workload`: an experiment YAML whose `workload` section makes the prompts (its arrival process is ignored:
    `--request-rate` schedules); `dataset`: a JSONL file; neither: the synthetic workload's defaults. Synthetic
    token ids are drawn below `vocab_size`. `num_requests` overrides the workload's count."""
    if workload is not None and dataset is not None:
        raise ConfigError("--dataset", "give --workload or --dataset, not both")
    sampling, explicit_seed = SamplingParams(), seed is not None
    if dataset is not None:
        return Prompts(read_dataset(dataset, num_requests, sampling.max_new_tokens, "--dataset"), 0.0, dataset,
                       seed or 0)
    if workload is not None:
        cfg = ExperimentConfig.from_yaml(workload)
        spec, sampling, seed = cfg.workload, cfg.sampling, cfg.seed if seed is None else seed
    else:
        spec, seed = ComponentSpec("synthetic", SyntheticConfig()), seed or 0
    source = f"{workload or 'default'}: workload {spec.name}"
    if spec.name == "jsonl":  # texts go to the server as text: it tokenizes, not this client
        limit = num_requests or spec.config.limit
        return Prompts(read_dataset(spec.config.path, limit, sampling.max_new_tokens, "workload.path"),
                       sampling.temperature, source, seed)
    config = spec.config
    if attrs.has(type(config)):
        names = {f.name for f in attrs.fields(type(config))}
        if num_requests is not None and "num_requests" in names:
            config = attrs.evolve(config, num_requests=num_requests)
        if explicit_seed and "seed" in names and config.seed is not None:
            config = attrs.evolve(config, seed=seed)  # an explicit --seed wins over the file's workload.seed
    factory = get_plugin_host().registry("workload").get(spec.name, "workload").factory
    made = factory(config, vocab_size=vocab_size, seed=seed).requests(sampling)
    if num_requests is not None:
        if len(made) < num_requests:
            raise ConfigError("--num-requests", f"workload {spec.name!r} made only {len(made)} requests, "
                                                f"{num_requests} asked for")
        made = made[:num_requests]
    requests = tuple(BenchRequest(tuple(r.prompt_ids), r.params.max_new_tokens) for r in made)
    return Prompts(requests, sampling.temperature, source, seed)


def read_dataset(path: str, limit: int | None, default_max_tokens: int, key: str) -> tuple[BenchRequest, ...]:
    """JSONL in the `jsonl` workload's format: `{"prompt": "text"}` or `{"prompt_ids": [1, 2]}`, with optional
    `max_new_tokens` (else `default_max_tokens`). With `limit`, the first `limit` rows, which must exist."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(key, f"no such file: {file}")
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM that editors on Windows write
    except UnicodeDecodeError as exc:
        raise ConfigError(key, f"{file} is not UTF-8 text: {exc}") from None
    out: list[BenchRequest] = []
    for lineno, line in enumerate(lines, 1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(key, f"{file}:{lineno} is not valid JSON: {exc}") from exc
        out.append(_row(row, f"{file}:{lineno}", default_max_tokens, key))
    if not out:
        raise ConfigError(key, f"{file} holds no prompts")
    if limit is not None and len(out) < limit:
        raise ConfigError("--num-requests", f"{file} holds only {len(out)} prompts, {limit} asked for")
    return tuple(out)


def _row(row: object, where: str, default_max_tokens: int, key: str) -> BenchRequest:
    if not isinstance(row, dict):
        raise ConfigError(key, f"{where}: expected a JSON object, got {type(row).__name__}")
    max_tokens = row.get("max_new_tokens", default_max_tokens)
    if not (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1):
        raise ConfigError(key, f"{where}: max_new_tokens must be an int >= 1, got {max_tokens!r}")
    if "prompt_ids" in row:
        ids = row["prompt_ids"]
        if not (isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
            raise ConfigError(key, f"{where}: prompt_ids must be a non-empty list of ints")
        return BenchRequest(tuple(ids), max_tokens)
    if isinstance(row.get("prompt"), str) and row["prompt"]:
        return BenchRequest(row["prompt"], max_tokens)
    raise ConfigError(key, f"{where}: needs 'prompt' (non-empty text) or 'prompt_ids'")
