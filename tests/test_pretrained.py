"""Loading a local pretrained checkpoint (weights and tokenizer saved by this test), text prompts in, text out;
and a graph key that omits a baked scalar computes with a stale shape (so keys must hold every scalar)."""

from __future__ import annotations

import pytest

from asyncbatch import Engine, EngineConfig, SamplingParams
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
