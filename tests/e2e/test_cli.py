"""The CLI as a user runs it: installed console script and `python -m imagine`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from imagine.samplers import SAMPLERS


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_samplers_prints_one_name_per_line():
    out = _run(sys.executable, "-m", "imagine", "samplers")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == list(SAMPLERS)


def test_samplers_json_has_a1111_aliases():
    out = _run(sys.executable, "-m", "imagine", "samplers", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert set(rows) == set(SAMPLERS)
    assert "DPM++ 2M Karras" in rows["dpmpp_2m"]["a1111_aliases"]
    assert rows["euler_a"]["a1111_aliases"] == ["Euler a"] and rows["euler_a"]["stochastic"] is True


@pytest.mark.skipif(shutil.which("imagine") is None, reason="console script not on PATH (not pip-installed)")
def test_console_script_matches_module():
    assert _run("imagine", "samplers").stdout == _run(sys.executable, "-m", "imagine", "samplers").stdout


def test_unknown_command_exits_nonzero_with_help():
    out = _run(sys.executable, "-m", "imagine", "sampel")
    assert out.returncode != 0
    assert "samplers" in out.stderr or "No such command" in out.stderr
