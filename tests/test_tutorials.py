"""The tutorials' code runs as written. Each fenced block preceded by `<!-- file: NAME -->` is written to NAME in
a fresh directory per tutorial; then its `test_*.py` files run under pytest and its `run_*.py` scripts run
with Python, from that directory, so a tutorial that drifts from the code fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"<!-- file: (?P<name>[\w.-]+) -->\s*\n```[\w-]*\n(?P<body>.*?)\n```", re.S)
TUTORIALS = sorted(p for p in DOCS.rglob("*.md") if "<!-- file:" in p.read_text())


def files_of(path: Path) -> dict[str, str]:
    return {m["name"]: m["body"] + "\n" for m in BLOCK.finditer(path.read_text())}


def test_every_file_marker_is_followed_by_a_code_block():
    for path in TUTORIALS:
        assert path.read_text().count("<!-- file:") == len(files_of(path)), path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_a_tutorials_files_run_as_written(path, tmp_path):
    files = files_of(path)
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    for script in sorted(n for n in files if n.startswith("run_") and n.endswith(".py")):
        done = subprocess.run([sys.executable, script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert 0 == done.returncode, f"{path.name}: {script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    tests = sorted(n for n in files if n.startswith("test_") and n.endswith(".py"))
    if tests:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert 0 == done.returncode, f"{path.name}: its tests failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
