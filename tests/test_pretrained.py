"""Loading a local pretrained checkpoint (weights and tokenizer saved by this test), text prompts in, text out;
`model.path` alone, with the checkpoint's EOS honoured like `generate()`; directories that are not checkpoints
fail with one line naming what is missing; and a graph key that omits a baked scalar computes with a stale shape
(so keys must hold every scalar)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from asyncbatch import ConfigError, Engine, EngineConfig, SamplingParams
from asyncbatch.cli import main
from asyncbatch.core.runtime.sim import SimRuntime, SimRuntimeConfig


def _save_tokenizer(path, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny32):
    path = tmp_path_factory.mktemp("ckpt")
    tiny32.save_pretrained(path)
    _save_tokenizer(path, tiny32.config.vocab_size)
    return path


def test_engine_loads_a_local_checkpoint_with_its_tokenizer(checkpoint, tiny32):
    """`model.path` loads weights and tokenizer from disk; text prompts are encoded, outputs decoded; tokens
    equal the in-memory model's."""
    engine = Engine.from_config(EngineConfig.from_dict({"model": {"preset": None, "path": str(checkpoint),
                                                                  "dtype": "float32"}, "runtime": "cpu"}))
    prompts = ["w5 w6 w7 w8", "w100 w200"]

    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=5))

    in_memory = Engine.from_model(tiny32, EngineConfig.from_dict({"runtime": "cpu"}))
    ids = [engine.tokenizer.encode(p) for p in prompts]
    assert [o.token_ids for o in in_memory.generate(ids, SamplingParams(max_new_tokens=5))] == \
        [o.token_ids for o in outputs]
    assert all(isinstance(o.text, str) and o.text for o in outputs)


def test_a_missing_checkpoint_is_a_config_error(tmp_path):
    """A path that is not a checkpoint directory fails naming the key."""
    from asyncbatch import ConfigError

    with pytest.raises(ConfigError, match="engine.model.path"):
        Engine.from_config(EngineConfig.from_dict({"model": {"preset": None, "path": str(tmp_path / "nope")}}))


PROMPTS = [[5, 6, 7, 8], [100, 200], [9, 10, 11], [300, 301, 302, 303, 304]]
NEW_TOKENS = 8


def _eos_in_some_outputs(outputs: list[tuple[int, ...]]) -> int:
    """A token that greedy decoding emits early (3rd token of some prompt) in some outputs but not all."""
    for out in outputs:
        if 0 < sum(out[2] in o for o in outputs) < len(outputs):
            return out[2]
    raise AssertionError("no early token ends only some of the outputs")


@pytest.fixture(scope="module")
def eos_checkpoint(tmp_path_factory, tiny32):
    """A checkpoint without tokenizer whose generation_config.json names an EOS that greedy decoding emits early;
    returns (path, eos, the in-memory model's tokens with EOS ignored)."""
    from transformers import GenerationConfig

    free = Engine.from_model(tiny32, EngineConfig.from_dict({"runtime": "cpu"})).generate(
        PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    tokens = [o.token_ids for o in free]
    eos = _eos_in_some_outputs(tokens)
    path = tmp_path_factory.mktemp("eos_ckpt")
    tiny32.save_pretrained(path)  # the shared fixture's own generation config is left as it is
    GenerationConfig(eos_token_id=eos, pad_token_id=0).save_pretrained(path)
    return path, eos, tokens


def test_model_path_alone_loads_and_honours_the_checkpoint_eos(eos_checkpoint):
    """`model: {path: DIR}` with no preset loads the checkpoint; its generation config's EOS ends requests with
    finish reason `stop`, the EOS the last token returned; requests that never emit it run to `length`."""
    path, eos, free = eos_checkpoint
    cfg = EngineConfig.from_dict({"model": {"path": str(path)}, "runtime": "cpu"})
    engine = Engine.from_config(cfg)

    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))

    expected = [t[: t.index(eos) + 1] if eos in t else t for t in free]
    assert (None, (eos,)) == (cfg.model.preset, engine.eos_ids)
    assert expected == [o.token_ids for o in outputs]
    assert ["stop" if eos in t else "length" for t in free] == [o.finish_reason for o in outputs]
    assert {"stop", "length"} == {o.finish_reason for o in outputs}


def test_ignore_eos_runs_a_checkpoint_to_length(eos_checkpoint):
    """`ignore_eos=True` generates past the checkpoint's EOS: every request runs to max_new_tokens."""
    path, eos, free = eos_checkpoint
    engine = Engine.from_config(EngineConfig.from_dict({"model": {"path": str(path)}, "runtime": "cpu"}))

    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))

    assert free == [o.token_ids for o in outputs]
    assert ["length"] * len(PROMPTS) == [o.finish_reason for o in outputs]
    assert any(eos in t[:-1] for t in free)  # some request did generate past its EOS


def test_no_preset_and_no_path_builds_the_tiny_preset(tiny32):
    """An engine config that names no model builds the `tiny` preset (same seed: the same weights)."""
    import torch

    engine = Engine.from_config(EngineConfig.from_dict({"model": {"dtype": "float32"}, "runtime": "cpu"}))

    expected = tiny32.state_dict()
    actual = engine.model.state_dict()
    assert sorted(expected) == sorted(actual)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


# ---------------------------------------------------------------- directories that are not checkpoints


def _config_without(key: str):
    def edit(path):
        data = json.loads((path / "config.json").read_text())
        del data[key]
        (path / "config.json").write_text(json.dumps(data))
    return edit


def _config_with(key: str, value):
    def edit(path):
        data = json.loads((path / "config.json").read_text())
        data[key] = value
        (path / "config.json").write_text(json.dumps(data))
    return edit


def _write(name: str, content: bytes):
    def edit(path):
        (path / name).write_bytes(content)
    return edit


def _remove(name: str):
    def edit(path):
        (path / name).unlink()
    return edit


def _replace_with_file(path):
    shutil.rmtree(path)
    path.write_text("not a directory")


def _bin_weights_corrupt(path):
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"garbage")


def _weights_missing_tensors(path):
    import torch
    from safetensors.torch import save_file

    save_file({"not_a_parameter": torch.zeros(2)}, str(path / "model.safetensors"))


def _weights_of_wrong_shape(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:10].contiguous()
    save_file(tensors, str(path / "model.safetensors"))


# case -> (how to spoil a copy of a good checkpoint, None: no such directory; a fragment of the message)
BAD_CHECKPOINTS = {
    "no_directory": (None, "no such checkpoint directory: {path}"),
    "a_file": (_replace_with_file, "{path} is a file, not a checkpoint directory"),
    "no_config": (_remove("config.json"), "{path} has no config.json: not a transformers checkpoint directory"),
    "config_not_json": (_write("config.json", b"{not json"), "{path}/config.json is unreadable: JSONDecodeError: "),
    "no_model_type": (_config_without("model_type"),
                      "{path}/config.json has no 'model_type': cannot tell the architecture"),
    "unknown_architecture": (_config_with("model_type", "no-such-arch"),
                             "{path}/config.json names an unknown architecture: model_type 'no-such-arch'"),
    "not_a_causal_lm": (_config_with("model_type", "t5"),
                        "{path}/config.json names architecture 't5', which transformers cannot load as a causal"),
    "no_weights": (_remove("model.safetensors"),
                   "{path} has no weights: no *.safetensors or pytorch_model*.bin file"),
    "corrupt_weights": (_write("model.safetensors", b"garbage"),
                        "cannot load the weights in {path}: SafetensorError: "),
    "corrupt_bin_weights": (_bin_weights_corrupt, "cannot load the weights in {path}: UnpicklingError: "),
    "missing_tensors": (_weights_missing_tensors,
                        "cannot load the weights in {path}: 21 of the model's tensors are missing from the weight "
                        "files, e.g. lm_head.weight, "),
    "wrong_shapes": (_weights_of_wrong_shape,
                     "cannot load the weights in {path}: 1 tensor(s) of the wrong shape, e.g. "
                     "model.embed_tokens.weight is (10, 64) in the checkpoint but (512, 64) in the model"),
}


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory, tiny32):
    path = tmp_path_factory.mktemp("plain") / "ckpt"
    tiny32.save_pretrained(path)
    return path


def _bad_checkpoint(case: str, plain_checkpoint, tmp_path):
    spoil, fragment = BAD_CHECKPOINTS[case]
    path = tmp_path / f"bad_{case}"
    if spoil is not None:
        shutil.copytree(plain_checkpoint, path)
        spoil(path)
    return path, fragment.format(path=path)


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_directory_is_a_one_line_config_error(case, plain_checkpoint, tmp_path):
    """Each way a directory can fail to be a checkpoint is a ConfigError on `engine.model.path` that names the
    directory and what is missing, in one line."""
    path, fragment = _bad_checkpoint(case, plain_checkpoint, tmp_path)

    with pytest.raises(ConfigError) as info:
        Engine.from_config(EngineConfig.from_dict({"model": {"path": str(path)}, "runtime": "cpu"}))

    assert "engine.model.path" == info.value.key
    assert fragment in info.value.message
    assert 1 == len(str(info.value).splitlines())


@pytest.mark.parametrize("case", ["no_directory", "no_config", "unknown_architecture", "no_weights",
                                  "corrupt_weights", "missing_tensors"])
def test_the_cli_reports_a_bad_checkpoint_in_one_line_and_exits_2(case, plain_checkpoint, tmp_path, capsys):
    """`asyncbatch run` with a bad `engine.model.path` exits 2 with one error line on stderr, no traceback."""
    path, fragment = _bad_checkpoint(case, plain_checkpoint, tmp_path)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"engine": {"model": {"path": str(path)}, "runtime": "cpu"},
                                   "workload": {"name": "synthetic", "num_requests": 2}}))

    code = main(["--log-level", "warning", "run", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"])

    err = capsys.readouterr().err
    assert 2 == code
    assert 1 == len(err.splitlines())  # no traceback, no load report, no progress bar (stderr is no terminal)
    assert err.startswith("asyncbatch: config error: engine.model.path: ")
    assert fragment in err
    assert not (tmp_path / "out").exists()


def test_graph_keys_must_hold_every_baked_scalar(tiny64, monkeypatch):
    """Emulated graphs bind the Python scalars of the shape they were captured with. Keying per_slot graphs by
    token count alone (dropping the context bucket the reference backend bakes in) replays stale shapes and
    changes the tokens; the real key does not."""
    from asyncbatch.strategies.graphs import PerSlot

    cfg = EngineConfig.from_dict({"runtime": "sim", "attention": "sdpa", "graphs": "per_slot",
                                  "batch": {"max_tokens": 8, "max_seqs": 4}, "cache": {"num_blocks": 80,
                                                                                       "block_size": 4}})
    prompts = [[7, 8, 9], [1, 2], [3, 4]]  # short prompts: the context outgrows several buckets while decoding
    params = SamplingParams(max_new_tokens=40)
    reference = [o.token_ids for o in Engine.from_model(tiny64, EngineConfig.from_dict(
        {"runtime": "cpu", "attention": "sdpa"})).generate(prompts, params)]
    good = Engine.from_model(tiny64, cfg, runtime=SimRuntime(SimRuntimeConfig(seed=2))).generate(prompts, params)
    assert reference == [o.token_ids for o in good]

    monkeypatch.setattr(PerSlot, "key", lambda self, slot, shape: (slot, shape.tokens, shape.seqs))
    stale = Engine.from_model(tiny64, cfg, runtime=SimRuntime(SimRuntimeConfig(seed=2))).generate(prompts, params)

    assert reference != [o.token_ids for o in stale]
