"""The request's one schema (pipelines/settings.py) and the doors that take it, field by field: the CLI's
options (name, default, type, help), the job API's body (derived from it) and the web UI's fields. A setting
added to Settings and missing from a door fails here, naming the door."""

import re
from enum import Enum
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

import pytest

from imagine.pipelines.settings import KINDS, Settings, schemas
from imagine.server.schemas import JobRequest

COMMANDS = {"txt2img": "generate", "img2img": "img2img", "inpaint": "inpaint", "edit": "edit"}
STATIC = Path(__file__).resolve().parents[2] / "src" / "imagine" / "server" / "static"


def _plain(annotation):
    """The type under an Optional."""
    if get_origin(annotation) in (Union, type(int | None)):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _click_command(name: str):
    import typer

    from imagine.cli.app import app

    return typer.main.get_command(app).get_command(None, name)


def _cli_option(command, flag: str):
    for param in command.params:
        if flag in getattr(param, "opts", ()):
            return param
    return None


def test_every_setting_is_documented_and_none_is_a_sentinel():
    for s in schemas():
        assert s["help"].strip(), f"{s['name']} has no help"
        assert set(s["kinds"]) <= set(KINDS)
        plain = _plain(s["type"])
        if plain in (int, float) and s["default"] in (0, -1) and s["name"] not in (
                "seed", "noise_seed_delta", "guidance_rescale", "outpaint_left", "outpaint_right", "outpaint_up",
                "outpaint_down"):  # a real value there (0 pixels of border), not "none"
            pytest.fail(f"{s['name']} defaults to {s['default']}: write 'not given' as None")


@pytest.mark.parametrize("kind", KINDS)
def test_cli_options_follow_the_schema(kind):
    command = _click_command(COMMANDS[kind])
    for s in schemas():
        if s["cli"] is None or kind not in s["kinds"]:
            continue
        flag = s["cli"] or "--" + s["name"].replace("_", "-")
        option = _cli_option(command, flag)
        assert option is not None, f"imagine {command.name} has no {flag} for the setting {s['name']}"
        want = s["cli_default"][kind] if isinstance(s["cli_default"], dict) else s["cli_default"]
        got = option.default.value if hasattr(option.default, "value") else option.default
        assert got == want, f"imagine {command.name} {flag} defaults to {got!r}; the schema says {want!r}"
        assert (option.help or "").strip(), f"imagine {command.name} {flag} has no help"
        plain, takes = _plain(s["type"]), _plain(option.type_descriptor.annotation)
        if get_origin(plain) is Literal:  # a Literal is an Enum of the same values on the CLI
            assert isinstance(takes, type) and issubclass(takes, Enum), f"{flag} takes {takes}, not a choice"
            assert tuple(m.value for m in takes) == get_args(plain), f"{flag}'s choices differ from the schema's"
        elif s["name"] == "lora_strict":
            continue
        else:
            assert takes is plain, f"imagine {command.name} {flag} takes {takes}, the schema {plain}"


def test_cli_commands_take_no_setting_of_another_kind():
    """A txt2img-only setting (hires fix) is not an option of img2img, and so on."""
    for kind, name in COMMANDS.items():
        command = _click_command(name)
        for s in schemas():
            if s["cli"] is None or kind in s["kinds"] or s["name"] == "strength":
                continue
            flag = s["cli"] or "--" + s["name"].replace("_", "-")
            assert _cli_option(command, flag) is None, f"imagine {name} takes {flag}, which is not for {kind}"


def test_job_api_fields_are_the_schema():
    for s in schemas():
        field = JobRequest.model_fields.get(s["name"])
        if not s["api"]:
            assert field is None, f"the job API takes {s['name']}, which the schema keeps off it"
            continue
        assert field is not None, f"the job API lacks the setting {s['name']}"
        assert field.default == s["api_default"] and field.description == s["help"]
    assert set(JobRequest.model_fields) >= {s["name"] for s in schemas() if s["api"]}


def test_the_web_ui_has_every_api_setting():
    html, js = (STATIC / "index.html").read_text(), (STATIC / "app.js").read_text()
    body = js[js.index("function requestBody()"):]
    body = body[: body.index("\n}\n")]
    for s in schemas():
        if not s["api"]:
            continue
        assert f'id="{s["name"]}"' in html, f"the web UI has no field for {s['name']}"
        assert re.search(rf"\b{s['name']}\b", body), f"the web UI does not send {s['name']}"


def test_the_schema_check_fails_on_a_missing_option(monkeypatch):
    """Not vacuous: a setting whose option is missing is caught."""
    command = _click_command("generate")
    assert _cli_option(command, "--no-such-option") is None
    assert _cli_option(command, "--cfg") is not None
    assert Settings().tile is None and Settings().hires_steps is None
