"""Shared fixtures: models are built once per session (random weights from presets), float64 where token
identity is asserted, so that no argmax can flip on rounding."""

from __future__ import annotations

import pytest
import torch
from interpreted import import_triton_interpreted

from asyncbatch.core.config import ModelConfig
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host

if not torch.cuda.is_available():
    # The first import of triton decides whether its own library functions (tl.zeros, ...) run under the
    # interpreter; without a GPU every kernel test needs that, whichever test module is collected first.
    import_triton_interpreted()


def _model(preset: str, dtype: str = "float64"):
    model, _ = build_model(ModelConfig(preset=preset, dtype=dtype, device="cpu"), get_plugin_host())
    return model


@pytest.fixture(scope="session")
def tiny64():
    return _model("tiny")


@pytest.fixture(scope="session")
def tiny32():
    return _model("tiny", "float32")


@pytest.fixture(scope="session")
def model_factory():
    cache = {}

    def get(preset: str, dtype: str = "float64"):
        if (preset, dtype) not in cache:
            cache[preset, dtype] = _model(preset, dtype)
        return cache[preset, dtype]

    return get


def pytest_configure(config):
    # Tiny models on a small CI machine: one intra-op thread is several times faster than two fighting over
    # two cores (measured: 7 ms vs 150+ ms per step of the tiny model under load).
    import torch

    torch.set_num_threads(1)
