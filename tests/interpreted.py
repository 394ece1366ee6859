"""Loading Triton kernel modules under Triton's interpreter, so that their tests run on a CPU.

The interpreter must be chosen when triton is first imported: `import_triton_interpreted` sets TRITON_INTERPRET only
around that import (test modules call it at import time; the first to be collected decides). `interpreted_module`
then loads a kernel module afresh with the variable set, and puts it in `sys.modules` and on its package for the
duration, so a GPU test in the same pytest process still gets compiled kernels afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import pytest


def import_triton_interpreted() -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


@contextmanager
def interpreted_module(package: ModuleType, name: str) -> Iterator[ModuleType]:
    """`package.name` (a file next to the package's `__init__`) loaded under the interpreter."""
    full = f"{package.__name__}.{name}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        spec = importlib.util.spec_from_file_location(full, os.path.join(os.path.dirname(package.__file__),
                                                                         f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        mp.setitem(sys.modules, full, module)
        mp.setattr(package, name, module, raising=False)
        yield module


@contextmanager
def interpreted_attention_kernels() -> Iterator[ModuleType]:
    """The `triton` attention backend's kernel modules under the interpreter; yields `triton_kernels`. Its helpers
    load first, so that the kernel module imports the interpreted ones."""
    from asyncbatch.strategies import attention

    with (interpreted_module(attention, "triton_combine"), interpreted_module(attention, "triton_rows"),
          interpreted_module(attention, "triton_kernels") as module):
        yield module
