"""The parity suite cannot vanish: with IMAGINE_REQUIRE_ORACLES set (as CI sets it) a missing diffusers
fails the run; without it, the parity modules skip with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pytest_without_diffusers(tmp_path, require: bool):
    hidden = tmp_path / "hide" / "diffusers"
    hidden.mkdir(parents=True)
    # what an absent package raises (pytest 9's importorskip skips on ModuleNotFoundError only)
    (hidden / "__init__.py").write_text('raise ModuleNotFoundError("diffusers hidden by the test")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hide")}
    env.pop("IMAGINE_REQUIRE_ORACLES", None)
    if require:
        env["IMAGINE_REQUIRE_ORACLES"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=",
                           "tests/parity/test_schedules.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_missing_oracle_fails_where_it_is_required(tmp_path):
    run = _pytest_without_diffusers(tmp_path, require=True)
    assert run.returncode != 0
    assert "oracles, diffusers and peft, do not import" in run.stdout + run.stderr


def test_a_missing_oracle_skips_elsewhere(tmp_path):
    run = _pytest_without_diffusers(tmp_path, require=False)
    assert run.returncode == 5 and "1 skipped" in run.stdout  # 5: no test ran (the module skipped)
