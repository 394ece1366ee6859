"""`engine.fuse_rotary: always` where the attention backend cannot rotate (every backend on a CPU) was refused only
when the model was first bound to a run: `asyncbatch run` said so in one line, but `asyncbatch serve` built the
engine, started its HTTP side, and failed in the serving step loop with a traceback from each process (exit 1, or 3
with `front_end: thread`). It is now refused when the engine is built, as `fold_norms: always` is."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from asyncbatch import Engine, EngineConfig
from asyncbatch.cli import main
from asyncbatch.core.errors import UnsupportedError

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
MESSAGE = ("engine.fuse_rotary: 'always' cannot fuse here: the attention backend 'sdpa' does not apply the rotary "
           "embedding itself (engine.attention: triton does) (valid here: auto, never)")


def test_always_is_refused_when_the_engine_is_built(tiny32):
    with pytest.raises(UnsupportedError) as info:
        Engine.from_model(tiny32, EngineConfig.from_dict({"runtime": "cpu", "fuse_rotary": "always"}))

    assert MESSAGE == str(info.value)


def test_serve_refuses_always_in_one_line_before_serving(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    code = main(["--log-level", "warning", "serve", str(DEFAULT), "--port", str(port), "--set",
                 "engine.serve.front_end=thread", "--set", "engine.fuse_rotary=always"])

    err = capsys.readouterr().err
    assert (1, f"asyncbatch: error: {MESSAGE}", False) == (code, err.strip().splitlines()[-1], "Traceback" in err)
