"""The state a run needs a (possibly shared) transformers model in, set at the start of every run and undone by
`Engine.release()`: asyncbatch attention, fused projections, batch-invariant kernels, decode GEMMs, compiled layers.

Each switch is idempotent and in place, so engines that share one model take turns: each run puts the model the
way its engine was configured, whatever the previous engine did.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class ModelState:
    """What one engine wants of the model: `fused` projections, `invariant` kernels, `compiled` layers, the
    `decode_gemm` kernel ("torch" for cuBLAS, else one of `decode_gemm.KERNELS`), and `pdl` (programmatic dependent launch of the kernels that support it)."""

    fused: bool
    invariant: bool
    compiled: bool
    decode_gemm: str = "torch"
    pdl: bool = False
    fold_norms: str = "never"  # "auto": where the model allows it; "always": fail where it does not
    fuse_rotary: str = "never"  # the same choices, for the rotation inside the attention backend


def decide(config: Any, runtime: Any, graph_name: str) -> ModelState:
    """What an engine with `config` (an `EngineConfig`) on `runtime`, running graph policy `graph_name`, wants.

    `compile: auto` compiles only where steps are captured: with eager launches the compiled wrappers cost more
    host time per layer than fusion saves on the device. Batch-invariant engines always compile, so that every
    graph policy runs the same program (inductor's fused elementwise code rounds unlike eager's).
    `fuse_projections: auto` fuses on a real device. `decode_gemm` and `pdl`: see `decode_gemm.decide`."""
    from . import decode_gemm

    native = runtime.graph_support == "native"
    captured = native and graph_name != "eager"
    compiled = config.compile == "layers" or (config.compile == "auto" and (config.batch_invariant or captured))
    fused = config.fuse_projections == "always" or (config.fuse_projections == "auto" and native)
    gemm, pdl = decode_gemm.decide(config, runtime.device, captured)
    return ModelState(fused, config.batch_invariant, compiled, gemm, pdl, _fold_norms(config, gemm, fused),
                      config.fuse_rotary)


def _fold_norms(config: Any, gemm: str, fused: bool) -> str:
    """`fold_norms` as the engine will ask for it: needs the `tma` decode GEMM and fused projections."""
    from .errors import UnsupportedError

    if config.fold_norms == "never" or (gemm == "tma" and fused):
        return config.fold_norms
    if config.fold_norms == "always":
        raise UnsupportedError("engine.fold_norms: 'always' needs the tma decode GEMM and fused projections; this "
                               f"engine runs decode_gemm {gemm!r}, projections {'' if fused else 'not '}fused "
                               "(valid here: auto, never)")
    return "never"


def settle(model: Any, state: ModelState) -> None:
    """Fuse the weights now if `state` wants them fused, before the engine sizes its KV cache from free memory.

    Fusing concatenates weights into new tensors and frees the old ones piecewise; the allocator cannot reuse
    those pieces for the larger fused tensors. Fused after the KV cache had taken its share, a 70B shard needed
    ~15 GiB of fresh memory this way and ran out. Fused first, the KV cache is sized from what is really free
    afterwards: freed segments go back to the driver (with `expandable_segments`, every freed page does), and
    what stays stranded is simply not counted. `bind` at the start of each run finds the work done."""
    import torch

    from .fusion import set_fused

    param = next(model.parameters())
    if state.fused and set_fused(model, True) and param.device.type == "cuda":
        torch.cuda.empty_cache()


def bind(model: Any, state: ModelState, attention_context: Any) -> None:
    """Put `model` in `state`, with `attention_context` active for compiled layers."""
    from .attention_api import ATTN_IMPLEMENTATION, activate, use_context
    from .compile import attention_modules, set_compiled
    from .decode_gemm import set_decode_gemm
    from .fusion import set_fused
    from .invariant import set_batch_invariant
    from .models import prepare_model
    from .norm_fold import set_norm_fold
    from .rotary_fold import set_rotary_fused

    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        prepare_model(model)  # released (or switched back by its owner) since the last run
    # Fusion and the invariant swap see plain Linear layers; the twins of both swaps are reused below.
    set_norm_fold(model, False)
    set_rotary_fused(model, False)
    set_decode_gemm(model, "torch")
    set_batch_invariant(model, False)
    set_fused(model, state.fused)
    set_batch_invariant(model, state.invariant)
    set_decode_gemm(model, state.decode_gemm, state.pdl)
    _fold(model, state)
    _fuse_rotary(model, state, attention_context.backend)
    set_compiled(model, state.compiled)  # also undoes an earlier engine's compilation of a shared model
    if state.compiled:
        activate(attention_context, attention_modules(model))
    else:
        use_context(attention_context)


def _fold(model: Any, state: ModelState) -> None:
    from .errors import UnsupportedError
    from .norm_fold import set_norm_fold, unsupported_reason

    if state.fold_norms == "never":
        return
    reason = unsupported_reason(model)
    if reason is None:
        set_norm_fold(model, True, state.pdl)
    elif state.fold_norms == "always":
        raise UnsupportedError(f"engine.fold_norms: 'always' cannot fold here: {reason} (valid here: auto, never)")
    else:
        import logging

        logging.getLogger("asyncbatch").info("engine.fold_norms: auto leaves the layers unfolded: %s", reason)


def check_rotary(model: Any, state: ModelState, backend: Any, name: str | None = None) -> None:
    """Refuse `fuse_rotary: always` where it cannot be when the engine is built, as `fold_norms: always` is
    (`decide`): `bind` finds out only at the first run, which in `asyncbatch serve` is in the step loop, after the
    HTTP side has started (a traceback per process instead of one line)."""
    from .rotary_fold import unsupported_reason

    if state.fuse_rotary == "always":
        _refuse_rotary(unsupported_reason(model, backend, name))


def _refuse_rotary(reason: str | None) -> None:
    from .errors import UnsupportedError

    if reason is not None:
        raise UnsupportedError(f"engine.fuse_rotary: 'always' cannot fuse here: {reason} (valid here: auto, never)")


def _fuse_rotary(model: Any, state: ModelState, backend: Any) -> None:
    from .rotary_fold import set_rotary_fused, unsupported_reason

    if state.fuse_rotary == "never":
        return
    reason = unsupported_reason(model, backend)
    if reason is None:
        set_rotary_fused(model, True)
    elif state.fuse_rotary == "always":
        _refuse_rotary(reason)
    else:
        import logging

        logging.getLogger("asyncbatch").info("engine.fuse_rotary: auto leaves the rotary kernels: %s", reason)


def release(model: Any, caller_attention: str | None) -> None:
    """Give `model` back as it was handed over: its own attention, layers not compiled, plain `Linear` and norm
    modules (fused weights stay views of the concatenated ones: no copy)."""
    from .compile import set_compiled
    from .decode_gemm import set_decode_gemm
    from .fusion import set_fused
    from .invariant import set_batch_invariant
    from .norm_fold import set_norm_fold
    from .rotary_fold import set_rotary_fused

    set_compiled(model, False)
    set_norm_fold(model, False)
    set_rotary_fused(model, False)
    set_decode_gemm(model, "torch")
    set_batch_invariant(model, False)
    set_fused(model, False)
    if caller_attention is not None:
        model.set_attn_implementation(caller_attention)
