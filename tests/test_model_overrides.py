"""`engine.model.overrides` builds the preset's config as its class would with those values (derived fields
derived again, RoPE standardised: a transformers 4 `rope_scaling` without `rope_theta` keeps the preset's base
frequency), and a value that would crash mid-forward or compute NaN is a ConfigError naming the override, from
the preset or from a checkpoint's config.json. `asyncbatch run` in which every request failed exits 1."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers as t
from hf_reference import hf_greedy

from asyncbatch import ConfigError, Engine, EngineConfig, SamplingParams
from asyncbatch.cli import main
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.models import preset_config
from asyncbatch.core.plugin_host import get_plugin_host
from asyncbatch.plugins.presets import _TINY

PROMPTS = [[5, 6, 7, 8, 9], list(range(40, 75))]


def _config(preset: str = "tiny", **overrides):
    return preset_config(ModelConfig(preset=preset, overrides=overrides), get_plugin_host())


def test_rope_scaling_without_rope_theta_runs_as_transformers_does():
    """The known defect: set on the built config, the scaling lost rope_theta (TypeError in the rotary init)."""
    engine = Engine.from_config(EngineConfig.from_dict({
        "model": {"dtype": "float32", "overrides": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}},
        "runtime": "cpu", "cache": {"num_blocks": 64, "block_size": 8}}))

    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, ignore_eos=True))

    assert {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0} == engine.model.config.rope_parameters
    assert [hf_greedy(engine.model, p, 6) for p in PROMPTS] == [o.token_ids for o in outputs]


@pytest.mark.parametrize("overrides, expected", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, {"rope_type": "linear", "factor": 2.0,
                                                                "rope_theta": 500000.0}),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}}, {"rope_type": "dynamic", "factor": 4.0,
                                                                    "rope_theta": 500000.0}),
    ({"rope_scaling": None}, {"rope_type": "default", "rope_theta": 500000.0}),
    ({"rope_theta": 1000.0}, {"rope_type": "default", "rope_theta": 1000.0}),
])
def test_a_rope_override_keeps_the_presets_base_frequency_unless_given(overrides, expected):
    assert expected == _config("llama3-8b", **overrides).rope_parameters


@pytest.mark.parametrize("preset, overrides, fields", [
    ("tiny", {"hidden_size": 128}, {"head_dim": 32}),  # Llama derives head_dim = hidden_size / heads
    ("tiny-mistral", {"num_attention_heads": 8, "num_key_value_heads": 4}, {"head_dim": 8}),
    ("tiny-qwen3", {"hidden_size": 128}, {"head_dim": 16}),  # Qwen3's head_dim is its own field: kept
    ("tiny-qwen2", {"num_hidden_layers": 3}, {"layer_types": ["full_attention"] * 3}),
    ("tiny-qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
     {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 4}),
])
def test_an_override_derives_the_other_fields_as_the_config_class_does(preset, overrides, fields):
    """As if the preset had been built with the overrides; setting attributes left head_dim and layer_types stale
    (a model other than the one asked for, silently)."""
    actual = _config(preset, **overrides)

    assert fields == {k: getattr(actual, k) for k in fields}


def test_an_override_derives_what_the_class_would():
    assert t.LlamaConfig(**{**_TINY, "hidden_size": 128}).to_dict() == _config("tiny", hidden_size=128).to_dict()


LINEAR = {"rope_type": "linear", "factor": 2.0}
BAD_OVERRIDES = [  # (preset, overrides, key, message)
    ("tiny", {"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor",
     "expected a number > 0, got 0"),
    ("tiny", {"rope_parameters": {"rope_type": "linear", "factor": "2"}}, "rope_parameters.factor",
     "expected a number > 0, got '2'"),
    ("tiny", {"rope_scaling": {"rope_type": "yarn"}}, "rope_scaling.factor",
     "missing: RoPE type 'yarn' needs factor, original_max_position_embeddings"),
    ("tiny", {"rope_parameters": {"rope_type": "bogus"}}, "rope_parameters.rope_type",
     "unknown RoPE type 'bogus' (valid: default, dynamic, linear, llama3, longrope, proportional, yarn)"),
    ("tiny", {"rope_theta": -1.0}, "rope_theta", "expected a number > 0 (the base frequency), got -1.0"),
    ("tiny", {"rope_parameters": "linear"}, "rope_parameters",
     "expected a mapping (rope_type, rope_theta and the type's parameters) or null, got 'linear'"),
    ("tiny", {"rope_parameters": LINEAR, "rope_scaling": LINEAR}, "rope_scaling",
     "give rope_parameters or its old name rope_scaling, not both"),
    ("tiny", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 512}},
     "rope_parameters.high_freq_factor", "must be greater than low_freq_factor (4.0), got 4.0"),
    ("tiny", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0, 1.0], "long_factor": [1.0] * 8,
                                  "original_max_position_embeddings": 32}},
     "rope_parameters.short_factor", "expected a list of 8 numbers > 0 (one per rotary frequency), got [1.0, 1.0]"),
    ("tiny", {"num_key_value_heads": 3}, "num_key_value_heads",
     "3 does not divide num_attention_heads=4: each key/value head serves an equal group of query heads"),
    ("tiny", {"hidden_size": 66}, "hidden_size",
     "LlamaConfig refuses it: ValueError: The hidden size (66) is not a multiple of the number of attention heads "
     "(4)."),
    ("tiny", {"head_dim": 0}, "head_dim", "expected an int >= 1, got 0"),
    ("tiny", {"head_dim": 15}, "head_dim", "LlamaConfig refuses it: ValueError: RoPE requires an even rotary "
                                           "dimension, but got `head_dim`=15"),
    ("tiny", {"tie_word_embeddings": "yes"}, "tie_word_embeddings",
     "LlamaConfig refuses it: TypeError: Field 'tie_word_embeddings' expected bool, got str (value: 'yes')"),
    ("tiny", {"pad_token_id": 512}, "pad_token_id",
     "512 is outside the vocabulary of 512 tokens (the embedding's padding row)"),
    ("tiny", {"hidden_act": "bogus"}, "hidden_act", "unknown activation 'bogus' (valid: gelu, "),
    ("tiny", {"model_type": "mistral"}, "model_type", "cannot be overridden: the architecture is the preset's"),
    ("tiny", {"to_dict": 1}, "to_dict", "not a field of LlamaConfig"),  # an attribute, but no field: it crashed
    ("tiny-mistral", {"sliding_window": 0}, "sliding_window",
     "expected null (no window) or an int >= 1 (the keys a query sees), got 0"),
    ("tiny-qwen2", {"sliding_window": 8}, "sliding_window",
     "Qwen2Config sets it to None, not 8, from its other fields; use_sliding_window: true turns the window on"),
    ("tiny-qwen2", {"layer_types": ["sliding_attention"]}, "layer_types",
     "Qwen2Config refuses it: ValueError: `num_hidden_layers` (2) must be equal to the number of `layer_types` (1)"),
]


@pytest.mark.parametrize("preset, overrides, key, message", BAD_OVERRIDES)
def test_an_override_the_model_cannot_compute_is_a_config_error_naming_it(preset, overrides, key, message):
    with pytest.raises(ConfigError) as info:
        _config(preset, **overrides)

    assert (f"engine.model.overrides.{key}", True) == (info.value.key, info.value.message.startswith(message))


@pytest.mark.parametrize("overrides, expected", [
    ("{rope_scaling: {rope_type: linear, factor: 2.0}}", (0, "")),
    ("{num_key_value_heads: 3}", (2, "asyncbatch: config error: engine.model.overrides.num_key_value_heads: 3 does "
                                     "not divide num_attention_heads=4: each key/value head serves an equal group of "
                                     "query heads\n")),
])
def test_the_cli_runs_a_valid_override_and_refuses_a_bad_one_in_one_line(overrides, expected, tmp_path, capsys):
    code = main(["--log-level", "error", "run", "--no-progress", "--set", f"engine.model.overrides={overrides}",
                 "--set", "workload.num_requests=4", "--out", str(tmp_path / "out")])

    assert expected == (code, capsys.readouterr().err)


def test_a_run_in_which_every_request_failed_exits_1_with_a_reason(tmp_path, capsys):
    """Every prompt of the default workload (16 tokens or more) is longer than a 16-token context leaves room for."""
    out = tmp_path / "out"
    code = main(["--log-level", "error", "run", "--no-progress", "--set",
                 "engine.model.overrides={max_position_embeddings: 16}", "--set", "workload.num_requests=3",
                 "--out", str(out)])

    err = capsys.readouterr().err
    assert (1, 1, True) == (code, len(err.splitlines()), err.startswith("asyncbatch: error: every request failed "
                                                                        "(3 of 3), e.g. req-0: prompt of "))
    assert f"(results: {out / 'results.json'})" in err


# ---------------------------------------------------------------- checkpoints whose config.json cannot compute


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny32):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny32.save_pretrained(path)
    return path


BAD_CONFIGS = [  # (config.json keys, the message after "<path>/config.json: ")
    ({"rope_parameters": {"rope_type": "linear", "factor": 0, "rope_theta": 1e4}},
     "rope_parameters.factor: expected a number > 0, got 0"),  # ran: NaN logits, every token 0
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}},
     "rope_parameters.rope_theta: expected a number > 0 (the base frequency), got 0"),
    ({"model_type": "mistral", "sliding_window": 0},
     "sliding_window: expected null (no window) or an int >= 1 (the keys a query sees), got 0"),
    ({"num_key_value_heads": 3}, "num_key_value_heads: 3 does not divide num_attention_heads=4: "),
    ({"max_position_embeddings": 0}, "max_position_embeddings: expected an int >= 1, got 0"),  # ran unbounded
    ({"num_hidden_layers": 0}, "num_hidden_layers: expected an int >= 1, got 0"),  # ran with no layer
    ({"rope_parameters": {"rope_type": "bogus", "rope_theta": 1e4}}, "rope_parameters.rope_type: unknown RoPE "),
]


@pytest.mark.parametrize("changes, message", BAD_CONFIGS)
def test_a_checkpoint_config_the_model_cannot_compute_is_refused_before_its_weights_are_read(
        changes, message, checkpoint, tmp_path, monkeypatch):
    from asyncbatch.core import checkpoints

    path = tmp_path / "bad"
    shutil.copytree(checkpoint, path)
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, **changes}))
    monkeypatch.setattr(checkpoints, "load_weights", lambda *a, **k: pytest.fail("weights were read"))

    with pytest.raises(ConfigError) as info:
        Engine.from_config(EngineConfig.from_dict({"model": {"path": str(path)}, "runtime": "cpu"}))

    assert ("engine.model.path", True) == (info.value.key, info.value.message.startswith(
        f"{path}/config.json: {message}"))


# ---------------------------------------------------------------- sweep cells: every cell's model checked up front


def test_a_sweep_cell_whose_override_cannot_compute_is_refused_before_any_cell_runs(tmp_path, capsys):
    """Cell 2 of 2 is the bad one: nothing may run, and no result directory may be made."""
    out = tmp_path / "out"
    code = main(["--log-level", "error", "run", "--no-progress", "--set", "workload.num_requests=2", "--set",
                 "sweep={engine.model.overrides.num_key_value_heads: [2, 3]}", "--out", str(out)])

    err = capsys.readouterr().err
    assert (2, False) == (code, out.exists())
    assert err.startswith("asyncbatch: config error: sweep cell {'engine.model.overrides.num_key_value_heads': 3}: "
                          "engine.model.overrides.num_key_value_heads: 3 does not divide num_attention_heads=4")


def test_a_sweep_cell_whose_checkpoint_is_not_one_is_refused_before_any_cell_runs(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nothing-here"
    code = main(["--log-level", "error", "run", "--no-progress", "--set", "workload.num_requests=2", "--set",
                 "engine.model={path: " + str(checkpoint) + "}", "--set",
                 "sweep={engine.model.path: [" + f"{checkpoint}, {missing}" + "]}", "--out", str(out)])

    err = capsys.readouterr().err
    assert (2, False) == (code, out.exists())
    assert f"sweep cell {{'engine.model.path': '{missing}'}}: engine.model.path: no such checkpoint directory" in err
