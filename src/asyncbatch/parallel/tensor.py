"""Tensor parallelism: one model's decoder layers sharded over the ranks of a group, Megatron style.

In each decoder layer the attention heads and the MLP's intermediate features are split across the group:
q/k/v and gate/up keep the output rows of this rank's heads or features (column-parallel, no communication);
o_proj and down_proj keep the matching input columns and sum their partial outputs over the group
(row-parallel, one all-reduce each). Embeddings, norms and `lm_head` stay whole (`lm_head` can be split by
vocabulary: `parallel.vocab`), so after each all-reduce every rank holds the same hidden states, computes the
same logits and samples the same tokens. Every rank then runs the same scheduler on the same requests and makes
the same decisions: no rank has to send the batch to another.
The KV cache is sharded by KV heads for free, since each rank's attention sees its own heads only.

The sharding is done in place on a model with the transformers layout (`model.<base>.layers[i].self_attn.
{q,k,v,o}_proj`, `.mlp.{gate,up,down}_proj`); a model without it is refused with the reason.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from ..core.errors import UnsupportedError

MARK = "_asyncbatch_tensor_parallel"  # set on a sharded model: the group size (model_geometry reads it)


@functools.cache
def _row_parallel_class() -> type:
    # One class for every layer, and one reducer per group (`_reducer`): torch.compile guards a compiled layer on
    # the types and objects it touches, so a class or reducer per layer made every layer recompile, and past the
    # recompile limit every layer ran eagerly (norms, rotary and activations as separate kernels, as measured on a
    # TP 2 step: 1,348 kernels against 484 at TP 1).
    import torch

    class RowParallelLinear(torch.nn.Module):
        """A Linear holding some input columns; its output is summed over the group by `reduce`
        (`parallel.all_reduce`)."""

        def __init__(self, inner: Any, reduce: Any) -> None:
            super().__init__()
            self.inner = inner
            object.__setattr__(self, "reduce", reduce)  # holds a process group: not a module attribute to trace

        def forward(self, x: Any) -> Any:
            return self.reduce(self.inner(x))

    return RowParallelLinear


KEY = "engine.parallel.tensor"
# Config keys naming a mixture-of-experts MLP (transformers maps most models' own names onto one of these). Its
# experts are no dense gate/up/down projections, which is what a rank splits.
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _indivisible(counts: dict[str, int], size: int) -> list[str]:
    """The rule, for a config's counts and a built layer's alike: every rank holds whole heads and an equal share of
    the MLP features, so `size` must divide each count. Returns the counts it does not divide, as `name=count`."""
    return [f"{name}={total}" for name, total in counts.items() if total % size]


def _check(name: str, total: int, size: int) -> None:
    """A built layer's own count (`shard_layer`): a layer can differ from what its config says of all of them."""
    if _indivisible({name: total}, size):
        raise UnsupportedError(f"{KEY}={size} does not divide a decoder layer's {name} ({total})")


def config_counts(config: Any) -> dict[str, int]:
    """What tensor parallelism splits, by config key: heads, KV heads, MLP features."""
    from ..core.model_support import text_config

    c = text_config(config)
    heads = getattr(c, "num_attention_heads", None) or 1  # no heads at all: `config_unsupported` says so
    counts = {"num_attention_heads": heads, "num_key_value_heads": getattr(c, "num_key_value_heads", None) or heads}
    mlp = getattr(c, "intermediate_size", None)
    if isinstance(mlp, (list, tuple)):  # one per layer (Gemma 3n)
        counts.update({f"intermediate_size[{i}]": v for i, v in enumerate(mlp) if isinstance(v, int)})
    elif isinstance(mlp, int):
        counts["intermediate_size"] = mlp
    return counts


def check_config(config: Any, size: int) -> None:
    """Refuse (`ConfigError` on `engine.parallel.tensor`) a tensor-parallel degree the model of this transformers
    config cannot be split over, from the config alone: no weight is read. `asyncbatch run` calls it before it starts
    any rank (`check_model`), and every rank again before it shards (`shard`, `ModelCache`): one rule for both."""
    from ..core.errors import ConfigError
    from ..core.model_support import text_config

    if size == 1:
        return
    c = text_config(config)
    name = type(config).__name__.removesuffix("Config") or "the model"
    experts = next((f"{k}={getattr(c, k)}" for k in _EXPERT_KEYS if getattr(c, k, None)), None)
    if experts:
        raise ConfigError(KEY, f"{size}: {name} has a mixture-of-experts MLP ({experts}); tensor parallelism splits "
                               "dense gate/up/down projections only (valid: 1)")
    counts = config_counts(config)
    bad = _indivisible(counts, size)
    if bad:
        common = math.gcd(*counts.values())
        valid = ", ".join(str(d) for d in range(1, common + 1) if common % d == 0)
        raise ConfigError(KEY, f"{size} does not divide {name}'s {', '.join(bad)}: each rank must hold whole "
                               f"attention and KV heads and an equal share of the MLP features (valid for this "
                               f"model: {valid})")


def check_model(model: Any, size: int, host: Any) -> None:
    """`check_config` for an `engine.model` section (`ModelConfig`): a preset's config, or a checkpoint's
    config.json (its weights are not read)."""
    if size == 1:
        return
    from pathlib import Path

    from ..core.models import checkpoint_config, preset_config

    preset = model.source_preset
    check_config(preset_config(model, host) if preset else checkpoint_config(Path(model.path).expanduser()), size)


def _keep_rows(linear: Any, parts: int, rank: int) -> None:
    import torch

    rows = linear.weight.shape[0] // parts
    sl = slice(rank * rows, (rank + 1) * rows)
    linear.weight = torch.nn.Parameter(linear.weight.data[sl].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[sl].clone(), requires_grad=False)
    linear.out_features = rows


def _keep_head_rows(norm: Any, parts: int, rank: int) -> None:
    import torch

    rows = norm.weight.shape[0] // parts
    sl = slice(rank * rows, (rank + 1) * rows)
    norm.weight = torch.nn.Parameter(norm.weight.data[sl].clone(), requires_grad=False)
    if getattr(norm, "bias", None) is not None:
        norm.bias = torch.nn.Parameter(norm.bias.data[sl].clone(), requires_grad=False)


def _keep_columns(linear: Any, parts: int, rank: int) -> None:
    import torch

    cols = linear.weight.shape[1] // parts
    linear.weight = torch.nn.Parameter(linear.weight.data[:, rank * cols:(rank + 1) * cols].clone(),
                                       requires_grad=False)
    if linear.bias is not None and rank != 0:  # the sum over the group adds the bias once
        linear.bias = torch.nn.Parameter(torch.zeros_like(linear.bias), requires_grad=False)
    linear.in_features = cols


def shard_layer(layer: Any, i: int, group: Any, rank: int, size: int, model_name: str = "the model",
                all_reduce: str = "nccl") -> None:
    """Shard decoder layer `i` in place: this rank keeps its heads and MLP features; its row-parallel layers sum
    over `group` the `all_reduce` way (see `parallel.all_reduce`)."""
    import torch

    from .all_reduce import Reducer

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    row_parallel = _row_parallel_class()
    for parent, columns, row in ((attn, ("q_proj", "k_proj", "v_proj"), "o_proj"),
                                 (mlp, ("gate_proj", "up_proj"), "down_proj")):
        mods = [getattr(parent, n, None) for n in (*columns, row)]
        if parent is None or not all(type(m) is torch.nn.Linear for m in mods):
            raise UnsupportedError(f"decoder layer {i} of {model_name} lacks the transformers layout tensor "
                                   f"parallelism shards ({', '.join((*columns, row))} as Linear)")
        norms = []
        if parent is attn and getattr(attn, "head_dim", None):
            _check("attention heads", mods[0].out_features // attn.head_dim, size)
            _check("KV heads", mods[1].out_features // attn.head_dim, size)
            norms = _head_norms(attn, i, model_name)
        if parent is mlp:
            _check("MLP intermediate size", mods[0].out_features, size)
        for m in mods[:-1]:
            _keep_rows(m, size, rank)
        for norm in norms:  # one row of weights per head: this rank keeps its heads' rows
            _keep_head_rows(norm, size, rank)
        _keep_columns(mods[-1], size, rank)
        reduce = _reducer(Reducer, group, all_reduce, mods[-1].weight.dtype, mods[-1].weight.device)
        setattr(parent, row, row_parallel(mods[-1], reduce))


def _head_norms(attn: Any, i: int, model_name: str) -> list[Any]:
    """The q/k norms of a layer that need sharding with its heads: those with one row of weights per head (Cohere).
    A norm over one head's features (Qwen3) is shared by every head and stays whole. A norm over all heads'
    features at once (OLMo 2) needs every head's values, which no rank holds: refused."""
    out = []
    for name, proj in (("q_norm", attn.q_proj), ("k_norm", attn.k_proj)):
        weight = getattr(getattr(attn, name, None), "weight", None)
        if weight is None or weight.numel() == attn.head_dim:
            continue
        heads = proj.out_features // attn.head_dim
        if weight.dim() == 2 and weight.shape[0] == heads:
            out.append(getattr(attn, name))
        else:
            raise UnsupportedError(f"decoder layer {i} of {model_name} normalises its {name[0]} projection over all "
                                   f"heads at once ({name} weight {tuple(weight.shape)}): a tensor-parallel rank "
                                   "holds only some heads and cannot compute it")
    return out


_reducers: dict[tuple, tuple[Any, Any]] = {}  # (group id, kind, dtype, device) -> (group, its reducer)


def _reducer(make: Any, group: Any, kind: str, dtype: Any, device: Any) -> Any:
    """The group's one reducer for this kind and dtype, shared by every layer (see `_row_parallel_class`)."""
    key = (id(group), kind, str(dtype), str(device))
    held = _reducers.get(key)
    if held is None or held[0] is not group:  # an id can come back for a new group: keep the group to compare
        held = _reducers[key] = (group, make(group, kind, dtype, device))
    return held[1]


def layer_sharder(world: Any, model_name: str = "the model") -> Any:
    """`on_layer` for `build_model`: shards each layer of this rank as it is built (None without tensor
    parallelism); `model_name` is what its refusals call the model. The caller finishes the built model with
    `mark_sharded`."""
    if world.tensor == 1:
        return None
    return lambda i, layer: shard_layer(layer, i, world.tp_group, world.tp_rank, world.tensor, model_name,
                                        all_reduce=world.all_reduce)


def mark_sharded(model: Any, size: int, *, group: Any = None, rank: int = 0, shard_head: bool = False) -> None:
    """Finish a model whose layers are sharded: its output head too where `shard_head` (`parallel.vocab`)."""
    if shard_head:
        from .vocab import shard_output_head

        shard_output_head(model, group, rank, size)
    setattr(model, MARK, size)


def shard(model: Any, group: Any, rank: int, size: int, all_reduce: str = "nccl", shard_head: bool = False) -> bool:
    """Shard `model` in place for rank `rank` of a tensor-parallel `group` of `size`; False if it already is."""
    from ..core.compile import decoder_layers

    if getattr(model, MARK, 1) == size:
        return False
    if getattr(model, MARK, 1) != 1:
        raise UnsupportedError(f"this model is already sharded {getattr(model, MARK)} ways")
    check_config(model.config, size)
    for i, layer in enumerate(decoder_layers(model)):
        shard_layer(layer, i, group, rank, size, type(model).__name__, all_reduce)
    mark_sharded(model, size, group=group, rank=rank, shard_head=shard_head)
    return True


def prepare(model: Any, world: Any) -> None:
    """Shard the (possibly cached) model for this rank. The group's engines agree on one KV block count when
    they are built (`kv_blocks_agreement`)."""
    shard(model, world.tp_group, world.tp_rank, world.tensor, world.all_reduce, world.shard_lm_head)


def kv_blocks_agreement(world: Any) -> Any:
    """The engine's `agree_kv_blocks` for this rank: the smallest count over all ranks. Sized from free device
    memory, the count could differ by a few blocks between ranks, and with it the scheduler's decisions: the
    ranks would no longer run the same batches."""
    return world.min if world.tensor > 1 else None


def check_requests(requests: Any) -> None:
    """Every rank schedules on its own, so nothing may depend on its clock: a request that arrives later would
    be admitted at a slightly different step on each rank, and their batches would differ."""
    if any(r.arrival_time > 0 for r in requests):
        raise UnsupportedError("engine.parallel.tensor needs offline arrivals (workload.arrival.process: offline) "
                               "for now")
