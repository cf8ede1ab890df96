"""`imagine ARGS` run inside the test process, answering as subprocess.run would (returncode, stdout,
stderr): the e2e tests pay a process start (torch, transformers, the text encoder: 3 to 8 s) only where a
separate process is the point (the console script, a kill and resume, a server)."""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from imagine.cli import app


@dataclass
class Ran:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def imagine(*args, cwd: Path | str | None = None, env: dict[str, str] | None = None, timeout: float | None = None
            ) -> Ran:
    """Like subprocess.run([python, -m, imagine, *args], capture_output=True, text=True, cwd=cwd, env=env): an
    exception that escapes the CLI gives returncode 1 and its traceback on stderr, as it would there.
    ``timeout`` is accepted for the callers' sake and not enforced."""
    argv = [str(a) for a in args]
    before = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, argv, env=env, catch_exceptions=True)
    finally:
        os.chdir(before)
    stderr = result.stderr
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
        code = code or 1
    return Ran(["imagine", *argv], code, result.stdout, stderr)
