"""`environment.json`: what a result depends on besides its config: versions, device, plugins, environment."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.config import ExperimentConfig
from ..core.plugin_host import ENTRY_POINT_GROUP, LIFECYCLE_HOOKS, PluginHost

# Variables that change what torch, CUDA, Triton, NCCL, Hugging Face or asyncbatch do, recorded with their values.
ENV_NAMES = ("CUDA_VISIBLE_DEVICES", "CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "PYTHONHASHSEED")
ENV_PREFIXES = ("PYTORCH_", "TORCH_", "TORCHINDUCTOR_", "TRITON_", "NCCL_", "ASYNCBATCH_", "HF_")
# Credentials must never land in a results directory that gets shared with a paper.
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def relevant_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The recorded variables (`ENV_NAMES`, names starting with `ENV_PREFIXES`), minus any whose name contains
    one of `SECRET_WORDS`; sorted by name."""
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in sorted(environ.items())
            if (k in ENV_NAMES or k.startswith(ENV_PREFIXES)) and not any(w in k.upper() for w in SECRET_WORDS)}


def entry_point_versions() -> dict[str, dict[str, str | None]]:
    """Entry point name -> its module and the distribution (name, version) that declares it."""
    out: dict[str, dict[str, str | None]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        out[ep.name] = {"value": ep.value, "distribution": dist.name if dist is not None else None,
                        "version": dist.version if dist is not None else None}
    return out


def plugin_versions(host: PluginHost) -> dict[str, Any]:
    """The plugins loaded in `host`, and every entry point installed (with whether it is loaded)."""
    loaded = host.plugin_names()
    return {"loaded": loaded,
            "entry_points": {name: {**info, "loaded": name in loaded} for name, info in entry_point_versions().items()}}


def lifecycle_only_plugins(host: PluginHost) -> list[tuple[str, list[str]]]:
    """(name, lifecycle hooks) of the plugins that implement lifecycle hooks and register no component."""
    out = []
    for name, plugin in sorted(host.pm.list_name_plugin(), key=lambda item: item[0]):
        hooks = [caller.name for caller in host.pm.get_hookcallers(plugin) or []]
        lifecycle = [h for h in LIFECYCLE_HOOKS if h in hooks]
        if lifecycle and len(lifecycle) == len(hooks):
            out.append((name, lifecycle))
    return out


def environment(cfg: ExperimentConfig, engine: Any, argv: Sequence[str]) -> dict[str, Any]:
    import torch
    import transformers

    import asyncbatch

    device = engine.runtime.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "asyncbatch": asyncbatch.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0], "platform": platform.platform(), "device": str(device),
        "device_name": name, "cuda": torch.version.cuda, "runtime": engine.runtime.name,
        "attention": getattr(engine, "attention_name", None), "torch_threads": torch.get_num_threads(),
        "seed": cfg.seed, "engine_seed": cfg.engine.seed, "model_seed": cfg.engine.model.seed,
        "command": list(argv), "plugins": plugin_versions(engine.host), "env": relevant_env(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
