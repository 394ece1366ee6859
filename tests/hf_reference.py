"""transformers' own greedy decoding, the reference that engine tokens are compared with in CPU tests."""

from __future__ import annotations

import torch


def hf_greedy(model, prompt, n):
    """transformers' own greedy tokens: one full forward (sdpa) over the sequence so far per token."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    seq = list(prompt)
    try:
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    finally:
        model.set_attn_implementation(previous)
    return tuple(seq[len(prompt):])
