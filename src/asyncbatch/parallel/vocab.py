"""A vocabulary-parallel output head (`engine.parallel.shard_lm_head`): each tensor-parallel rank keeps a slice of
`lm_head`'s rows, computes the logits of its slice of the vocabulary, and the group gathers them.

Kept whole, `lm_head` is read by every rank at every step: 1 GB of an 8B Llama's 15 GB, so at TP 2 an eighth of
what a rank reads, and at TP 4 a quarter. Sharded, each rank reads its share; the price is one all-gather of the
step's logits (rows x vocabulary values). Every rank then holds the same logits, bit for bit (a gather only moves
values), so the ranks still sample the same tokens. A vocabulary that does not divide by the group size is padded
with zero rows, whose logits are cut off after the gather.
"""

from __future__ import annotations

import logging
from typing import Any

from ..core.errors import UnsupportedError

log = logging.getLogger("asyncbatch")


def _head_class() -> type:
    import torch

    class VocabParallelHead(torch.nn.Module):
        """`lm_head` of one rank: `inner` holds rows [rank * rows, (rank + 1) * rows) of the padded vocabulary."""

        def __init__(self, inner: Any, full_vocab: int, group: Any, size: int) -> None:
            super().__init__()
            self.inner = inner
            self.full_vocab = full_vocab  # `model_geometry` reads the vocabulary here
            self.size = size
            object.__setattr__(self, "group", group)  # a process group is not a module attribute to trace

        def forward(self, x: Any) -> Any:
            import torch.distributed as dist

            local = self.inner(x).contiguous()
            if local.is_cuda:  # one NCCL call into one buffer (capturable in a CUDA graph)
                out = torch.empty((self.size, *local.shape), dtype=local.dtype, device=local.device)
                dist.all_gather_into_tensor(out, local, group=self.group)
                parts = out.unbind(0)
            else:
                parts = [torch.empty_like(local) for _ in range(self.size)]
                dist.all_gather(parts, local, group=self.group)
            return torch.cat(parts, dim=-1)[..., : self.full_vocab]

        def extra_repr(self) -> str:
            return f"vocabulary {self.full_vocab} over {self.size} ranks, {self.inner.out_features} rows here"

    return VocabParallelHead


def shard_output_head(model: Any, group: Any, rank: int, size: int) -> None:
    """Replace `model`'s output head by this rank's vocabulary slice of it (in place)."""
    import torch

    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise UnsupportedError(f"engine.parallel.shard_lm_head: {type(model).__name__}'s output head is a "
                               f"{type(head).__name__}, not a Linear")
    vocab, hidden = head.weight.shape
    rows = -(-vocab // size)
    lo, hi = min(vocab, rank * rows), min(vocab, (rank + 1) * rows)
    weight = torch.zeros(rows, hidden, dtype=head.weight.dtype, device=head.weight.device)
    weight[: hi - lo] = head.weight.data[lo:hi]  # a copy: the embedding may share the whole weight (tied)
    inner = torch.nn.Linear(hidden, rows, bias=head.bias is not None, device="meta")
    inner.weight = torch.nn.Parameter(weight, requires_grad=False)
    if head.bias is not None:
        bias = torch.zeros(rows, dtype=head.bias.dtype, device=head.bias.device)
        bias[: hi - lo] = head.bias.data[lo:hi]
        inner.bias = torch.nn.Parameter(bias, requires_grad=False)
    model.set_output_embeddings(_head_class()(inner, vocab, group, size))
    log.info("parallel: lm_head split by vocabulary: rows %d-%d of %d here", lo, hi, vocab)
