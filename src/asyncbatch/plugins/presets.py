"""Model presets: transformers configs for random-weight models. `tiny` runs on a CPU in seconds; `llama3-8b` and
`llama3-70b` are the Llama-3 shapes for GPU benchmarks (no download: weights are random)."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class PresetConfig:
    """Presets take no parameters; use `engine.model.overrides` to change fields of the built config."""


_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)


def tiny(config: PresetConfig) -> Any:
    """Tiny Llama (2 layers, hidden 64, GQA 4/2, vocab 512): the default for tests and the CPU demo."""
    from transformers import LlamaConfig

    return LlamaConfig(**_TINY)


def tiny_qwen2(config: PresetConfig) -> Any:
    """Tiny Qwen2 (attention biases on q/k/v)."""
    from transformers import Qwen2Config

    return Qwen2Config(**_TINY, use_sliding_window=False)


def tiny_qwen3(config: PresetConfig) -> Any:
    """Tiny Qwen3 (q/k RMS norms, explicit head_dim)."""
    from transformers import Qwen3Config

    return Qwen3Config(**_TINY, head_dim=16, use_sliding_window=False)


def tiny_mistral(config: PresetConfig) -> Any:
    """Tiny Mistral with a 64-token sliding window (exercises windowed attention)."""
    from transformers import MistralConfig

    return MistralConfig(**_TINY, sliding_window=64)


def small(config: PresetConfig) -> Any:
    """A ~50M-parameter Llama for quick GPU checks (8 layers, hidden 512, vocab 32000)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)


def llama3_8b(config: PresetConfig) -> Any:
    """The Llama-3-8B shape: hidden 4096, 32 layers, 32 heads / 8 KV heads, FFN 14336, vocab 128256, untied."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
                       eos_token_id=128001)


def llama3_70b(config: PresetConfig) -> Any:
    """The Llama-3-70B shape: hidden 8192, 80 layers, 64 heads / 8 KV heads, FFN 28672, vocab 128256, untied
    (141 GB in bf16: tensor parallelism over four 80 GB cards, each rank building only its shard)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
                       eos_token_id=128001)


PRESETS = {"tiny": tiny, "tiny-llama": tiny, "tiny-qwen2": tiny_qwen2, "tiny-qwen3": tiny_qwen3,
           "tiny-mistral": tiny_mistral, "small": small, "llama3-8b": llama3_8b,
           "llama3-70b": llama3_70b}
