"""`asyncbatch list`: every component with its plugin and config, one line per row when piped, fitted to the
terminal's width otherwise. (Plugins that only observe: test_run_context.py.)"""

from __future__ import annotations

import pytest

from asyncbatch.cli import main
from asyncbatch.core.registry import FAMILIES

BUILTIN = "asyncbatch.plugins.builtin"


def _list(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--log-level", "warning", "list", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_columns(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)


def test_list_shows_every_family_and_builtin(capsys, no_columns):
    code, out, _ = _list(capsys)
    assert code == 0
    rows = [line.split() for line in out.splitlines()[2:]]
    pairs = {(r[0], r[1]) for r in rows}
    assert {r[0] for r in rows} == set(FAMILIES)
    for pair in [("scheduler", "fifo"), ("scheduler", "priority"), ("buffer_policy", "single"),
                 ("buffer_policy", "n_slot"), ("stream_topology", "three"), ("graph_policy", "per_slot"),
                 ("graph_policy", "staged"), ("attention_backend", "sdpa"), ("runtime", "sim"),
                 ("runtime", "cuda"), ("model_preset", "tiny"), ("model_preset", "llama3-8b"),
                 ("workload", "synthetic"), ("workload", "jsonl")]:
        assert pair in pairs, pair
    assert all(r[2] == BUILTIN for r in rows)
    # Not a terminal, no COLUMNS: one line per component, description and config on it (for grep).
    n_slot = next(line for line in out.splitlines() if line.split()[:2] == ["buffer_policy", "n_slot"])
    assert "num_slots=3" in n_slot and "N slots" in n_slot
    sim = next(line for line in out.splitlines() if line.split()[:2] == ["runtime", "sim"])
    assert "order=random" in sim and "gpu_compute_ms: 10.0" in sim


def test_list_one_family(capsys, no_columns):
    code, out, _ = _list(capsys, "--family", "scheduler")
    assert code == 0
    assert {line.split()[0] for line in out.splitlines()[2:]} == {"scheduler"}
    code, _, err = _list(capsys, "--family", "schedulers")
    assert code == 2 and "buffer_policy" in err


def test_list_fits_100_columns(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    _, wide, _ = _list(capsys)
    assert max(len(line) for line in wide.splitlines()) > 100  # what there is to fit
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = _list(capsys)
    assert code == 0
    lines = out.splitlines()
    assert [] == [line for line in lines if len(line) > 100]
    # Every component still starts a line with its family, name and plugin; nothing of its text is lost.
    starts = {tuple(line.split()[:3]) for line in lines if line.split()[:1] and line.split()[0] in FAMILIES}
    wide_starts = {tuple(line.split()[:3]) for line in wide.splitlines()[2:]}
    assert wide_starts == starts
    def words(text: str) -> list[str]:
        return sorted(w for w in text.split() if set(w) != {"-"})

    assert words(wide) == words(out)
    fifo = lines.index(next(line for line in lines if line.split()[:2] == ["scheduler", "fifo"]))
    assert "chunked_prefill=true" in lines[fifo]
    assert lines[fifo + 1].strip().startswith("Decode first")  # the description under its row
