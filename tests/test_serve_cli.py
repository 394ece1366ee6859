"""`asyncbatch serve`: the real command in a subprocess (ready line, a completion, SIGTERM ends it gracefully with
exit 0), and the errors that come before any model is built (a bad config value, a port in use)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from asyncbatch.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.yaml"


def test_serve_runs_answers_and_stops_gracefully_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "asyncbatch", "serve", str(DEFAULT), "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killer = threading.Timer(60, proc.kill)  # a hung server fails the test instead of hanging it
    killer.start()
    try:
        log = []
        for line in proc.stderr:
            log.append(line)
            if "ready: serving" in line:
                break
        url = re.search(r"on (http://127\.0\.0\.1:\d+)", log[-1]).group(1)
        health = httpx.get(url + "/health")
        done = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4})
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        code = proc.wait(timeout=30)
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()

    assert (200, 200, 4) == (health.status_code, done.status_code, len(done.json()["choices"][0]["token_ids"]))
    assert 0 == code, "".join(log) + rest
    assert "Application shutdown complete" in rest


def test_a_bad_serve_value_is_a_config_error(capsys):
    code = main(["--log-level", "warning", "serve", str(DEFAULT), "--set", "engine.serve.max_waiting=0"])

    assert 2 == code
    assert "engine.serve.max_waiting: expected an int in [1, " in capsys.readouterr().err


def test_an_unknown_front_end_names_the_choices(capsys):
    code = main(["--log-level", "warning", "serve", str(DEFAULT), "--set", "engine.serve.front_end=fork"])

    assert 2 == code
    assert "engine.serve.front_end: 'fork' is not allowed (valid: process, thread)" in capsys.readouterr().err


def test_cpu_pinning_without_a_front_end_process_is_refused_by_name(capsys):
    code = main(["--log-level", "warning", "serve", str(DEFAULT), "--set", "engine.serve.front_end=thread", "--set",
                 "engine.serve.cpu_pinning=auto"])

    assert 2 == code
    assert ("engine.serve.cpu_pinning: pinning keeps a front-end process off the step loop's core: it needs "
            "engine.serve.front_end: process (valid: off)") in capsys.readouterr().err


def test_a_bare_yaml_off_turns_cpu_pinning_off(tmp_path):
    cfg = tmp_path / "off.yaml"
    cfg.write_text(DEFAULT.read_text() + "\n")
    from asyncbatch.core.config import ExperimentConfig

    assert "off" == ExperimentConfig.from_yaml(cfg, overrides=["engine.serve.cpu_pinning=off"]).engine.serve.cpu_pinning


def test_a_port_in_use_fails_before_the_model_is_built(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        code = main(["--log-level", "warning", "serve", str(DEFAULT), "--port", str(port)])

    err = capsys.readouterr().err
    assert 1 == code
    assert f"asyncbatch: error: cannot listen on 127.0.0.1:{port}: " in err
    assert "built tiny" not in err


def test_a_missing_web_stack_is_named_with_the_install_command(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed: importing it raises

    code = main(["--log-level", "warning", "serve", str(DEFAULT)])

    err = capsys.readouterr().err
    assert 1 == code
    assert "asyncbatch serve needs fastapi, uvicorn and prometheus_client: " in err
    assert "pip install fastapi uvicorn prometheus_client" in err
