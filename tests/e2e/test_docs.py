"""Every command the guides under docs/ show (and the README's) is one the CLI takes: the command exists, and
each option exists and parses to its type. Running them all would train for hours; the README's tour runs
whole in test_readme.py, and each command family has its own end-to-end tests."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from imagine.cli import app

try:  # newer typer carries its own copy of click
    from typer._click import exceptions
except ImportError:
    from click import exceptions

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands(page: Path) -> list[list[str]]:
    """The imagine commands of a page's bash blocks: lines joined at trailing backslashes, comments dropped,
    split at && and ;."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in [*words, "&&"]:
                if word in ("&&", ";", "||"):
                    if command and command[0] == "imagine":
                        out.append(command[1:])
                    command = []
                else:
                    command.append(word)
    return out


def parse(args: list[str]):
    """Parse like `imagine ARGS` without running anything; the command reached."""
    command = typer.main.get_command(app)
    ctx = command.make_context("imagine", list(args))
    while hasattr(command, "resolve_command"):  # a group: on to the subcommand
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, sub, rest = command.resolve_command(ctx, rest)
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub
    return command


CASES = [(page.relative_to(ROOT).as_posix(), args) for page in PAGES for args in shown_commands(page)]


@pytest.mark.parametrize("bad", [["generate", "x", "--bogus"], ["nope"], ["eval", "shapes", "--bogus"],
                                 ["generate", "x", "--steps", "abc"]])
def test_a_command_that_is_not_the_clis_does_not_parse(bad):
    with pytest.raises(exceptions.ClickException):
        parse(bad)


def test_the_guides_show_commands():
    pages = {page for page, _ in CASES}
    assert len(CASES) >= 60 and {"README.md", "docs/training.md", "docs/adapters.md", "docs/serving.md"} <= pages


@pytest.mark.parametrize(("page", "args"), CASES, ids=[f"{p}:{' '.join(a)[:60]}" for p, a in CASES])
def test_a_shown_command_parses(page, args):
    try:
        parse(args)
    except typer.Exit:  # --help, --version
        pass
    except exceptions.ClickException as err:
        pytest.fail(f"{page}: `imagine {shlex.join(args)}` does not parse: {err.format_message()}")
