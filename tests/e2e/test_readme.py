"""The README's two set-up commands: the first installs and runs the main job (an image from the shipped
model, its path printed), the second is the one CI runs."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up\n.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no '## Set up' bash block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_pinning_cpu_torch():
    commands = _readme_commands()
    assert len(commands) == 2
    assert all("torch==2.13.0" in c for c in commands)  # unpinned torch pulls gigabytes of CUDA wheels


def test_ci_runs_the_readme_test_command():
    test_command = _readme_commands()[1]
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_first_command_installs_and_generates_an_image(tmp_path):
    """What follows the install in the first command runs as written, in a fresh folder: it prints the
    path of a PNG made by the shipped model."""
    install, _, job = _readme_commands()[0].partition(" && ")
    assert install.startswith("pip install torch==2.13.0 -e .")
    argv = shlex.split(job)
    assert argv[:2] == ["imagine", "generate"] and len(argv) == 3, argv  # the shipped model, no flags
    exe = [shutil.which("imagine")] if shutil.which("imagine") else [sys.executable, "-m", "imagine"]
    run = subprocess.run([*exe, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = Path(tmp_path, run.stdout.strip().splitlines()[-1])
    assert printed.is_file() and printed.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", run.stdout


def _tour_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## A five-minute tour\n.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no '## A five-minute tour' bash block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_tour_runs_as_written(tmp_path, monkeypatch):
    """Each command of the README's tour, in order, in a fresh folder (in-process; `serve` is only parsed:
    the server has its own tests): each succeeds, --from gives the same pixels, the upscale is 256 px."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from imagine.cli import app
    from tests.e2e.test_docs import parse

    monkeypatch.chdir(tmp_path)
    commands = _tour_commands()
    assert [shlex.split(c)[1] for c in commands] == ["generate", "info", "generate", "img2img", "upscale", "outpaint",
                                                     "edit", "models", "serve"]
    printed = {}
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "imagine"
        if argv[1] == "serve":
            parse(argv[1:])
            continue
        result = CliRunner().invoke(app, argv[1:])
        assert result.exit_code == 0, f"{command}: {result.output[-2000:]}"
        printed[command] = result.stdout
    outputs = tmp_path / "outputs"
    first = outputs / "000001-txt2img.png"
    assert sorted(p.name for p in outputs.glob("00000[0-3]-txt2img.png")) == [f"00000{i}-txt2img.png" for i in range(4)]
    info = next(v for k, v in printed.items() if " info " in k)
    assert "Seed: 1" in info and "two white circles" in info
    again = Path(next(v for k, v in printed.items() if "--from" in k).strip().splitlines()[-1])
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    upscaled = Path(next(v for k, v in printed.items() if "upscale" in k).strip().splitlines()[-1])
    assert Image.open(upscaled).size == (256, 256)
    grown = Path(next(v for k, v in printed.items() if " outpaint " in k).strip().splitlines()[-1])
    assert Image.open(grown).size == (96, 64)
    edited = Path(next(v for k, v in printed.items() if " edit " in k).strip().splitlines()[-1])
    assert Image.open(edited).size == (64, 64)
