"""Step buffers that cannot fit: `engine.buffers: {name: n_slot, num_slots: 1000000}` or
`engine.batch.max_tokens=2147483647` asked for 112 GiB or 160 GiB of slot buffers. The KV cache was checked
against the memory free, the slots were not: the process was killed by the OS without a word (or, under a memory
limit, an internal error from torch's allocator). They are now checked the same way, before any allocation, and
refused as a config error naming the key (exit 2)."""

from __future__ import annotations

import pytest

from asyncbatch import Engine, EngineConfig
from asyncbatch.cli import main
from asyncbatch.core.errors import ConfigError
from asyncbatch.core.runtime.cpu import CpuRuntime

FREE = 1 << 20  # 1 MiB: the tiny model's 4 KV blocks fit, 64 slots of step buffers (~8 MiB) do not


@pytest.fixture
def little_memory(monkeypatch):
    monkeypatch.setattr(CpuRuntime, "free_memory", lambda self: FREE)


def test_slots_that_cannot_fit_are_a_config_error_naming_the_key(tiny32, little_memory):
    many = EngineConfig.from_dict({"runtime": "cpu", "cache": {"num_blocks": 4},
                                   "buffers": {"name": "n_slot", "num_slots": 64}, "batch": {"max_seqs": 64}})
    wide = EngineConfig.from_dict({"runtime": "cpu", "cache": {"num_blocks": 4},
                                   "batch": {"max_tokens": 1 << 20, "max_seqs": 8}})

    with pytest.raises(ConfigError) as slots:
        Engine.from_model(tiny32, many)
    with pytest.raises(ConfigError) as batch:
        Engine.from_model(tiny32, wide)

    assert "engine.buffers.num_slots" == slots.value.key
    assert str(slots.value).startswith("engine.buffers.num_slots: 64 slots of step buffers for "
                                       "engine.batch.max_tokens=2048 and max_seqs=64 need ")
    assert "engine.batch" == batch.value.key
    assert str(batch.value).endswith(" MiB; 1.0 MiB is free on cpu")


def test_slots_that_fit_still_build(tiny32, little_memory):
    cfg = EngineConfig.from_dict({"runtime": "cpu", "cache": {"num_blocks": 4},
                                  "batch": {"max_tokens": 64, "max_seqs": 4}})

    assert 2 == Engine.from_model(tiny32, cfg).pipeline.num_slots


def test_the_cli_exits_2_in_one_line(tmp_path, capsys, little_memory):
    code = main(["--log-level", "warning", "run", "--set", "workload.num_requests=1", "--no-progress",
                 "--set", "engine.cache.num_blocks=4", "--set", "engine.buffers={name: n_slot, num_slots: 64}",
                 "--out", str(tmp_path / "out")])

    err = capsys.readouterr().err.strip()
    assert (2, True) == (code, err.startswith("asyncbatch: config error: engine.buffers.num_slots: 64 slots of "))
    assert 1 == len(err.splitlines())
