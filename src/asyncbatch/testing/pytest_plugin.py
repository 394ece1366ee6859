"""asyncbatch's pytest plugin: fixtures of the test kit, for plugin authors' tests and asyncbatch's own.

pytest loads it through the ``pytest11`` entry point ``asyncbatch`` in every run where asyncbatch is installed, so
loading it imports neither torch nor hypothesis (the fixtures do, when used). Every fixture is session-scoped
(hypothesis tests may use it) and named ``asyncbatch_*``. Disable it with ``-p no:asyncbatch``.

- ``asyncbatch_host``: a `PluginHost` with the built-ins and every installed plugin (entry points).
- ``asyncbatch_model_factory``: ``get(preset="tiny", dtype="float64")``, a CPU model with random weights, built
  once per (preset, dtype) per session; presets are looked up in ``asyncbatch_host``. While in use, torch runs
  one intra-op thread.
- ``asyncbatch_tiny_model``: ``asyncbatch_model_factory()``, the tiny float64 model.
- ``asyncbatch_check``: a `Checker`, i.e. `check_engine` / `check_component` bound to those two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def asyncbatch_host() -> Any:
    """A `PluginHost` with the built-ins and every installed plugin (entry points), created once per session."""
    from asyncbatch.core.plugin_host import PluginHost

    return PluginHost.create()


@pytest.fixture(scope="session")
def asyncbatch_model_factory(asyncbatch_host: Any) -> Iterator[Callable[..., Any]]:
    """``get(preset="tiny", dtype="float64")``: a CPU model with random weights from a preset of
    `asyncbatch_host`, built once per (preset, dtype) per session.

    While the session uses it, torch runs one intra-op thread (restored at the end): a tiny model gains nothing
    from more, and on a busy small machine threads fighting over cores make each step 10-60x slower."""
    import torch

    from asyncbatch.testing.models import tiny_model

    cache: dict[tuple[str, str], Any] = {}

    def get(preset: str = "tiny", dtype: str = "float64") -> Any:
        if (preset, dtype) not in cache:
            cache[preset, dtype] = tiny_model(preset, dtype, host=asyncbatch_host)
        return cache[preset, dtype]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield get
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def asyncbatch_tiny_model(asyncbatch_model_factory: Callable[..., Any]) -> Any:
    """The `tiny` preset in float64 (token comparisons across batch shapes need it), shared by the session."""
    return asyncbatch_model_factory()


@pytest.fixture(scope="session")
def asyncbatch_check(asyncbatch_tiny_model: Any, asyncbatch_host: Any) -> Any:
    """`asyncbatch.testing.Checker`: ``asyncbatch_check(config, workload, data=...)`` runs `check_engine`,
    ``asyncbatch_check.component(family, spec)`` runs `check_component`, on `asyncbatch_tiny_model` with
    `asyncbatch_host`."""
    from asyncbatch.testing.component import Checker

    return Checker(asyncbatch_tiny_model, asyncbatch_host)
