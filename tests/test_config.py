"""Configuration: every mistake fails at load time naming the dotted key and the valid choices; configs round
trip through YAML; importing asyncbatch or a scheduler pulls in no torch, CUDA or transformers."""

from __future__ import annotations

import subprocess
import sys

import attrs
import pytest
import yaml

from asyncbatch import ConfigError, EngineConfig, ExperimentConfig, UnknownComponent


@pytest.mark.parametrize("data,key,fragment", [
    ({"bogus": 1}, "bogus", "valid: attention, batch, batch_invariant, buffers, cache, compile, decode_gemm, fold_norms, fuse_projections, fuse_rotary, graphs, model, parallel, pdl, prefix_cache, runtime"),
    ({"fuse_projections": "yes"}, "fuse_projections", "valid: always, auto, never"),
    ({"decode_gemm": "cublas"}, "decode_gemm", "valid: auto, tma, torch, triton"),
    ({"pdl": True}, "pdl", "valid: always, auto, never"),
    ({"scheduler": "fastest"}, "scheduler", "valid: fair_prefix, fifo, longest_prefix_first, prefill_first, priority, shortest_first"),
    ({"buffers": {"name": "n_slot", "num_slots": 1}}, "buffers.num_slots", "at least 2 slots"),
    ({"buffers": {"name": "n_slot", "num_slots": "3"}}, "buffers.num_slots", "expected an int"),
    ({"batch": {"max_seqs": 0}}, "batch.max_seqs", "must be > 0"),
    ({"batch": {"max_tokens": 8, "max_seqs": 16}}, "batch.max_seqs", "<= batch.max_tokens"),
    ({"graphs": {"name": "per_slot", "max_capture": 5}}, "graphs.max_capture", "valid: decode_only, max_capture_tokens"),
    ({"model": {"preset": "tiny", "dtype": "float8"}}, "model.dtype", "valid: auto, bfloat16"),
    ({"model": {"preset": "tiny", "path": "/x"}}, "model", "give one of 'preset'"),
    ({"compile": "yes"}, "compile", "valid: auto, layers, none"),
])
def test_bad_engine_config_names_the_key(data, key, fragment):
    """Unknown keys, unknown names, wrong types and bad values fail naming the key and the choices."""
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_dict(data)

    assert info.value.key.endswith(key)
    assert fragment in str(info.value)


def test_model_path_alone_is_a_checkpoint_and_neither_is_the_tiny_preset():
    """`model: {path: DIR}` needs no `preset: null`; with neither given the `tiny` preset is built. The fields
    keep what was given, so that the config round trips."""
    by_path = EngineConfig.from_dict({"model": {"path": "/ckpt"}}).model
    default = EngineConfig.from_dict({}).model
    named = EngineConfig.from_dict({"model": {"preset": "small"}}).model

    assert (None, "/ckpt", None) == (by_path.preset, by_path.path, by_path.source_preset)
    assert (None, None, "tiny") == (default.preset, default.path, default.source_preset)
    assert ("small", None, "small") == (named.preset, named.path, named.source_preset)


def test_model_preset_and_path_together_name_both():
    """Both given is an error on `model` that names both keys and both values."""
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_dict({"model": {"preset": "tiny", "path": "/ckpt"}})

    assert "model" == info.value.key
    assert ("give one of 'preset' (random weights, got 'tiny') or 'path' (local checkpoint, got '/ckpt'), not both"
            == info.value.message)


@pytest.mark.parametrize("model", [{}, {"path": "/ckpt"}, {"preset": "tiny-qwen3", "dtype": "float32"}])
def test_model_section_round_trips_through_yaml(model, tmp_path):
    """A saved config reloads equal, whether it named a preset, a path, or neither."""
    exp = ExperimentConfig.from_dict({"engine": {"model": model}})
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp.to_dict()))

    assert exp == ExperimentConfig.from_yaml(path)
    assert exp.engine == EngineConfig.from_dict(exp.engine.to_dict())


def test_a_sweep_over_model_path_needs_no_preset_null():
    """Sweeping `engine.model.path` over a base that names no preset gives one checkpoint cell per path; over a
    base that names a preset every cell has both, which is refused at load time."""
    cells = ExperimentConfig.from_dict({"sweep": {"engine.model.path": ["/a", "/b"]}}).sweep_cells()

    assert [("/a", None), ("/b", None)] == [(c.engine.model.path, c.engine.model.source_preset) for _, c in cells]
    with pytest.raises(ConfigError, match="not both"):
        ExperimentConfig.from_dict({"engine": {"model": {"preset": "tiny"}}, "sweep": {"engine.model.path": ["/a"]}})


def test_unknown_component_is_its_own_error():
    """An unknown name is an UnknownComponent with the family and the registered names."""
    with pytest.raises(UnknownComponent) as info:
        EngineConfig.from_dict({"streams": "four"})

    assert ("stream_topology", "four", ["one", "three", "two"]) == (info.value.family, info.value.name,
                                                                    info.value.valid)


def test_sweep_over_a_missing_key_fails_before_anything_is_built():
    """A sweep key that names no config field is refused at load time, listing the keys that exist there."""
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({"sweep": {"engine.batch.max_seq": [1, 2]}})

    assert "sweep.engine.batch.max_seq" == info.value.key
    assert "max_seqs" in str(info.value)


def test_a_sweep_cell_with_a_bad_value_is_refused():
    """Each cell is validated when the experiment loads."""
    with pytest.raises(ConfigError, match="n_slot needs at least 2 slots"):
        ExperimentConfig.from_dict({"engine": {"buffers": {"name": "n_slot"}},
                                    "sweep": {"engine.buffers.num_slots": [3, 1]}})


def test_experiment_round_trips_through_yaml(tmp_path):
    """to_dict -> YAML -> from_yaml gives an equal config (the saved config.yaml reruns the same experiment)."""
    exp = ExperimentConfig.from_dict({"engine": {"buffers": {"name": "n_slot", "num_slots": 4},
                                                 "batch": {"max_tokens": 64, "max_seqs": 8}},
                                      "workload": {"name": "synthetic", "num_requests": 5},
                                      "sampling": {"temperature": 0.5, "stop_token_ids": [2]},
                                      "sweep": {"engine.scheduler.name": ["fifo", "priority"]}})
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp.to_dict()))

    assert exp == ExperimentConfig.from_yaml(path)
    assert 2 == len(exp.sweep_cells())


def test_overrides_apply_dotted_keys(tmp_path):
    """`--set a.b=c` values are YAML: numbers, booleans, lists and component names."""
    path = tmp_path / "e.yaml"
    path.write_text("engine: {buffers: double}\nworkload: synthetic\n")

    exp = ExperimentConfig.from_yaml(path, overrides=["engine.buffers=single", "workload.num_requests=3",
                                                      "engine.batch.token_buckets=[4, 8]"])

    assert ("single", 3, (4, 8)) == (exp.engine.buffers.name, exp.workload.config.num_requests,
                                     exp.engine.batch.token_buckets)


def test_overrides_on_a_section_the_file_leaves_out_start_from_its_default(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("name: short\nengine: {model: {preset: tiny}}\n")

    exp = ExperimentConfig.from_yaml(path, overrides=["workload.num_requests=8", "engine.cache.block_size=8",
                                                      "output.plots=false"])

    assert ("synthetic", 8) == (exp.workload.name, exp.workload.config.num_requests)
    assert (8, False, "short") == (exp.engine.cache.block_size, exp.output.plots, exp.name)
    default = ExperimentConfig.from_dict({"workload": "synthetic"}).workload.config
    assert attrs.evolve(default, num_requests=8) == exp.workload.config


def test_an_unknown_preset_fails_with_the_config_not_with_the_run():
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict({"engine": {"model": {"preset": "llama9"}}})

    assert "engine.model.preset" == err.value.key
    assert "tiny" in err.value.valid


@pytest.mark.parametrize("threads", [0, -1, 5000, "two"])
def test_engine_threads_is_checked(threads):
    with pytest.raises(ConfigError) as err:
        EngineConfig.from_dict({"threads": threads})
    assert "threads" == err.value.key


def test_engine_threads_sets_torch_intra_op_threads(tiny32):
    import torch

    from asyncbatch import Engine

    before = torch.get_num_threads()
    try:
        Engine.from_model(tiny32, EngineConfig.from_dict({"threads": 1, "runtime": "cpu"}))
        assert 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("count", "text"), [(640, "640"), (140_352, "140K"), (1_235_000, "1.24M"),
                                             (8_030_261_248, "8.03B")])
def test_parameter_counts_read_well_at_every_scale(count, text):
    from asyncbatch.core.models import count_text

    assert text == count_text(count)


def test_import_is_light():
    """`import asyncbatch` and the scheduler module import neither torch nor transformers."""
    code = ("import sys, asyncbatch, asyncbatch.strategies.schedulers, asyncbatch.core.config; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert "[]" == out.strip()
