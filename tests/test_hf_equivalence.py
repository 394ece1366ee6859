"""Greedy outputs equal transformers' own forward, token for token, on four architectures; also with
chunked prefill forced (a small token budget) and with preemption forced (a cache too small for all). With the
model's EOS on, requests stop where `generate()` stops, also when the asynchronous pipeline learns it late."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from asyncbatch import Engine, EngineConfig, SamplingParams

ARCHITECTURES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]
NEW_TOKENS = 10


def _prompts(n: int = 18, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, 5, 17, 33, 64, 70, 97] + [rng.randint(1, 100) for _ in range(n - 8)]
    return [[rng.randrange(512) for _ in range(length)] for length in lengths]


def _hf_greedy(model, prompts: list[list[int]], new_tokens: int, *, eos: bool = False) -> list[tuple[int, ...]]:
    """Greedy tokens by transformers' own forward (sdpa): exactly `new_tokens`, each from one full forward over
    the sequence so far; or with `eos`, `generate()` under the model's generation config (its EOS on, stopping
    early; pad tokens follow).

    The full forward is the model's definition. `generate()` disagrees with it on sliding-window models once a
    sequence passes the window (transformers 5.24, Mistral with a 64-token window: a 98-token prompt's third
    token differs, with or without its cache), so it is the reference only where EOS handling is the point."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        out = []
        with torch.no_grad():
            for p in prompts:
                if eos:
                    cfg = copy.deepcopy(model.generation_config)
                    cfg.update(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=None, pad_token_id=0)
                    # An explicit mask: otherwise generate() masks out prompt tokens equal to pad_token_id.
                    x = torch.tensor([p])
                    ids = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
                    out.append(tuple(ids[0, len(p):].tolist()))
                    continue
                seq = list(p)
                for _ in range(new_tokens):
                    seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
                out.append(tuple(seq[len(p):]))
        return out
    finally:
        model.set_attn_implementation(previous)


@pytest.fixture(scope="module")
def references(model_factory):
    prompts = _prompts()
    return prompts, {arch: _hf_greedy(model_factory(arch), prompts, NEW_TOKENS) for arch in ARCHITECTURES}


SETTINGS = {
    "default": {},
    "chunked": {"batch": {"max_tokens": 16, "max_seqs": 8}},
    "preempting": {"batch": {"max_tokens": 64, "max_seqs": 16}, "cache": {"num_blocks": 24, "block_size": 8}},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers_generate(model_factory, references, arch, setting):
    """Every request's greedy tokens equal transformers' own generate() for the same prompt."""
    prompts, refs = references
    cfg = EngineConfig.from_dict({"runtime": "cpu", **SETTINGS[setting]})
    engine = Engine.from_model(model_factory(arch), cfg)

    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))

    assert refs[arch] == [o.token_ids for o in outputs]
    assert ["length"] * len(prompts) == [o.finish_reason for o in outputs]
    summary = engine.last_result.summary
    if setting == "preempting":
        assert summary.preemptions > 0
    if setting == "chunked":
        assert max(s.num_tokens for s in engine.last_result.steps) <= 16


def test_async_sim_pipeline_matches_transformers(model_factory, references):
    """The default asynchronous combination on the sim runtime (reordered execution) gives the same tokens."""
    prompts, refs = references
    cfg = EngineConfig.from_dict({"runtime": "sim", "batch": {"max_tokens": 32, "max_seqs": 8},
                                  "cache": {"num_blocks": 40, "block_size": 8}})
    engine = Engine.from_model(model_factory("tiny-llama"), cfg)

    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))

    assert refs["tiny-llama"] == [o.token_ids for o in outputs]
    assert [] == engine.runtime.conflicts


# ---------------------------------------------------------------- EOS on


def _eos_candidate(refs: list[tuple[int, ...]]) -> int:
    """A token greedy decoding emits early (the 3rd token of some prompt) that ends some outputs but not all, so
    that both finish reasons occur."""
    for out in refs:
        token = out[2]
        hits = sum(token in r for r in refs)
        if 0 < hits < len(refs):
            return token
    raise AssertionError("no early token ends only some of the outputs")


def _trim_after_eos(tokens: tuple[int, ...], eos: int) -> tuple[int, ...]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


class _EosSet:
    """Sets `model.generation_config.eos_token_id` (what both generate() and the engine read), restores it on exit:
    models are session fixtures shared with other tests."""

    def __init__(self, model, eos: int) -> None:
        self.model, self.eos = model, eos

    def __enter__(self):
        self.previous = self.model.generation_config.eos_token_id
        self.model.generation_config.eos_token_id = self.eos
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.generation_config.eos_token_id = self.previous


@pytest.fixture(scope="module")
def eos_references(model_factory, references):
    """Per architecture: the EOS chosen from the EOS-free reference, and generate()'s outputs with it on."""
    prompts, refs = references
    out = {}
    for arch in ARCHITECTURES:
        eos = _eos_candidate(refs[arch])
        with _EosSet(model_factory(arch), eos) as model:
            out[arch] = eos, _hf_greedy(model, prompts, NEW_TOKENS, eos=True)
    return out


EOS_SETTINGS = {
    "cpu": {"runtime": "cpu"},
    # Three steps in flight on the reordering sim runtime: a request's EOS is learnt steps after it was sampled,
    # while its later tokens are already scheduled; those must never be returned.
    "sim_n_slot3": {"runtime": "sim", "buffers": {"name": "n_slot", "num_slots": 3},
                    "batch": {"max_tokens": 32, "max_seqs": 8}, "cache": {"num_blocks": 40, "block_size": 8}},
}


@pytest.mark.parametrize("setting", list(EOS_SETTINGS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_model_eos_stops_requests_like_transformers_generate(model_factory, references, eos_references, arch,
                                                             setting):
    """With the model's EOS on (the default), each request's tokens equal generate()'s output up to and including
    the first EOS; finish reason `stop` exactly where generate() stopped at EOS, `length` elsewhere."""
    prompts, refs = references
    eos, hf = eos_references[arch]
    with _EosSet(model_factory(arch), eos) as model:
        engine = Engine.from_model(model, EngineConfig.from_dict(EOS_SETTINGS[setting]))

    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))

    assert (eos,) == engine.eos_ids
    assert [_trim_after_eos(r, eos) for r in refs[arch]] == hf  # generate() itself stops at the first EOS
    assert hf == [o.token_ids for o in outputs]
    expected_reasons = ["stop" if eos in r else "length" for r in hf]
    assert expected_reasons == [o.finish_reason for o in outputs]
    assert {"stop", "length"} == set(expected_reasons)
    if setting.startswith("sim"):
        assert [] == engine.runtime.conflicts
