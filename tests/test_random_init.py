"""Random preset weights built a layer at a time: what transformers would build (same kinds of values, same
buffers), the same whatever is built around them, and a tensor-parallel rank that shards each layer as it is
built holds exactly the slices of the whole model."""

from __future__ import annotations

import pytest
import torch

from asyncbatch.core.compile import decoder_layers
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.errors import UnsupportedError
from asyncbatch.core.models import build_model, preset_config
from asyncbatch.core.plugin_host import get_plugin_host
from asyncbatch.core.random_init import random_model
from asyncbatch.parallel.tensor import shard, shard_layer

PRESETS = ["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]


def _build(preset: str, **kwargs):
    return build_model(ModelConfig(preset=preset, dtype="float32", device="cpu"), get_plugin_host(), **kwargs)[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_weights_are_of_the_kinds_transformers_builds_and_buffers_are_equal(preset):
    from transformers import AutoModelForCausalLM

    hf_config = preset_config(ModelConfig(preset=preset), get_plugin_host())
    ours = _build(preset)
    theirs = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)

    assert dict(theirs.named_buffers()).keys() == dict(ours.named_buffers()).keys()
    for name, buf in theirs.named_buffers():
        assert torch.equal(buf, dict(ours.named_buffers())[name]), name
    mine = dict(ours.named_parameters())
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    for name, p in theirs.named_parameters():
        q = mine[name]
        assert p.shape == q.shape, name
        if torch.all(p == p.flatten()[0]):  # ones (norms) or zeros (biases): exactly the same
            assert torch.equal(p, q), name
        else:
            assert abs(p.std().item() - q.std().item()) < 0.2 * p.std().item(), name


def test_the_same_seed_builds_the_same_weights_and_another_seed_others():
    a, b = _build("tiny"), _build("tiny")
    c = build_model(ModelConfig(preset="tiny", dtype="float32", device="cpu", seed=1), get_plugin_host())[0]

    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("size", [2])
def test_sharding_each_layer_as_it_is_built_gives_the_slices_of_the_whole_model(preset, size):
    for rank in range(size):
        whole = _build(preset)
        shard(whole, None, rank, size)
        piecewise = _build(preset, on_layer=lambda i, layer, r=rank: shard_layer(layer, i, None, r, size))

        assert whole.state_dict().keys() == piecewise.state_dict().keys()
        for (name, p), q in zip(whole.state_dict().items(), piecewise.state_dict().values()):
            assert torch.equal(p, q), (rank, name)
        layer = decoder_layers(piecewise)[0]
        assert layer.self_attn.q_proj.weight.shape[0] == whole.config.hidden_size // size


def test_a_tensor_left_unset_by_the_models_initialiser_is_refused(monkeypatch):
    from transformers import LlamaForCausalLM

    hf_config = preset_config(ModelConfig(preset="tiny"), get_plugin_host())
    real = LlamaForCausalLM._init_weights

    def skip_norms(self, module):
        if "RMSNorm" not in type(module).__name__:
            real(self, module)

    monkeypatch.setattr(LlamaForCausalLM, "_init_weights", skip_norms)

    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.input_layernorm\.weight is not set by the "
                                               r"model's own _init_weights"):
        random_model(hf_config, dtype=torch.float32, device=torch.device("cpu"), seed=0)
