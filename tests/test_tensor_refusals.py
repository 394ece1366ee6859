"""A tensor-parallel degree the model cannot be split over is refused from the model's config (no weight read),
before `asyncbatch run` starts any rank: a config error on `engine.parallel.tensor` naming the counts and the
degrees that would work. The ranks make the same check (`parallel.tensor.check_config`) before they shard."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from asyncbatch.core.errors import ConfigError
from asyncbatch.parallel.tensor import check_config, shard

ROOT = Path(__file__).resolve().parents[1]
REASON = "each rank must hold whole attention and KV heads and an equal share of the MLP features"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asyncbatch", "run", str(ROOT / "configs/default.yaml"),
                           "--no-progress", "--set", "workload.num_requests=2", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tensor,overrides,bad", [
    (3, "{}", "num_attention_heads=4, num_key_value_heads=2, intermediate_size=128"),
    (4, "{}", "num_key_value_heads=2"),
    (4, "{num_key_value_heads: 4, intermediate_size: 130}", "intermediate_size=130"),
])
def test_an_indivisible_model_is_refused_before_any_rank_starts(tmp_path, tensor, overrides, bad):
    """The tiny preset: 4 heads, 2 KV heads, 128 MLP features."""
    out = tmp_path / "tp"
    done = _cli("--out", str(out), "--set", f"engine.parallel.tensor={tensor}",
                "--set", f"engine.model.overrides={overrides}")

    expected = (f"asyncbatch: config error: engine.parallel.tensor: {tensor} does not divide Llama's {bad}: {REASON} "
                "(valid for this model: 1, 2)")
    assert (2, expected) == (done.returncode, done.stderr.strip())
    assert not out.exists()  # no rank was started: the launcher would have made out/ranks/


def test_a_mixture_of_experts_checkpoint_is_refused_from_its_config_alone(tmp_path):
    """Only dense gate/up/down projections split. The weight file is garbage: the refusal never reads it."""
    import transformers as t

    ckpt = tmp_path / "mixtral"
    config = t.MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    config.save_pretrained(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"not weights")
    out = tmp_path / "tp"

    done = _cli("--out", str(out), "--set", "engine.parallel.tensor=2", "--set", f"engine.model.path={ckpt}")

    expected = ("asyncbatch: config error: engine.parallel.tensor: 2: Mixtral has a mixture-of-experts MLP "
                "(num_local_experts=4); tensor parallelism splits dense gate/up/down projections only (valid: 1)")
    assert (2, expected) == (done.returncode, done.stderr.strip())
    assert not out.exists()


def test_a_rank_refuses_with_the_same_check(tiny32):
    """`shard` (what a rank runs on a loaded model) raises what `asyncbatch run` reports up front."""
    with pytest.raises(ConfigError) as up_front:
        check_config(tiny32.config, 3)
    with pytest.raises(ConfigError) as on_a_rank:
        shard(tiny32, None, 0, 3)

    assert str(up_front.value) == str(on_a_rank.value)


def test_per_layer_mlp_widths_are_each_checked():
    """A config with one MLP width per layer (Gemma 3n): every width must divide."""
    import transformers as t

    def gemma(widths: list[int]):
        return t.Gemma3nTextConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=widths, layer_types=["sliding_attention", "full_attention"])

    with pytest.raises(ConfigError, match=r"2 does not divide Gemma3nText's intermediate_size\[1\]=129: "):
        check_config(gemma([128, 129]), 2)
    check_config(gemma([128, 256]), 2)  # no error
