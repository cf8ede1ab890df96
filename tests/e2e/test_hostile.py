"""What a hostile but realistic client sends, against the real app with a models folder, through both APIs
(ours and A1111's, with the ControlNet extension's): each case is a 4xx that names the field (never a 500),
nothing reaches outside the models folder or says whether a path exists there, one client cannot change what
others get, heavy work is bounded and queued, the server keeps serving and its memory stays bounded. And the
CLI's side: one clear line for each."""

from __future__ import annotations

import base64
import io
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from imagine.cli import app as cli_app
from imagine.server import Limits, create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from serve_hostile import decompression_bomb, ztxt_bomb


def _b64(img: Image.Image, **save) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", **save)
    return base64.b64encode(buffer.getvalue()).decode()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def served(tiny_t2i_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    models = root / "models"
    for name in ("a", "b"):
        shutil.copytree(tiny_t2i_dir, models / "Stable-diffusion" / name)
    (models / "Stable-diffusion" / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a")
    (models / "Lora").mkdir()
    (models / "ControlNet" / "no-config").mkdir(parents=True)
    (models / "ControlNet" / "no-config" / "weights.bin").write_bytes(b"x")
    paths = [models / "Stable-diffusion" / n for n in ("a", "b")] + [models / "Stable-diffusion" /
                                                                      "truncated.safetensors"]
    app = create_app(paths, out_dir=None, models_dir=models, skip_broken=True,
                     limits=Limits(max_steps=20, max_pixels=64 * 64, max_batch=4, max_input_pixels=256 * 256))
    with TestClient(app, raise_server_exceptions=False) as client:
        client.models = models
        client.service = app.state.service
        yield client


def _refused(r, *words: str, status: tuple[int, ...] = (400, 404, 409, 413, 422)):
    assert r.status_code in status, (r.status_code, r.text[:500])
    detail = r.json()["detail"]
    for word in words:
        assert word in detail, (word, detail)
    return detail


PNG16 = _b64(Image.new("RGB", (16, 16), "red"))


def test_a_truncated_checkpoint_in_the_folder_is_listed_as_broken_and_the_rest_served(served):
    listing = served.get("/api/v1/models").json()
    assert {m["name"] for m in listing["models"]} == {"a", "b"}
    assert [b["path"].endswith("truncated.safetensors") for b in listing["broken"]] == [True]


# every numeric field of the job API at its bounds and beyond
@pytest.mark.parametrize(("field", "value"), [
    ("steps", 0), ("steps", 21), ("steps", 10**9), ("cfg_scale", 1e308), ("cfg_scale", -1), ("seed", 2**63),
    ("seed", -5), ("n", 0), ("n", 5), ("width", 4), ("width", 10**9), ("height", 10**6), ("guidance_rescale", 2),
    ("strength", 0), ("strength", 1.5), ("mask_blur", 65), ("clip_skip", 0), ("clip_skip", 1000),
    ("noise_seed_delta", 10**30), ("hires_scale", 9), ("hires_scale", 0.5), ("hires_strength", 2),
    ("hires_steps", -1), ("tile", -1), ("inpaint_padding", 10**6), ("sr_noise_level", -1),
    ("prompt", "x" * 4001), ("prompt", "red\x00circle"), ("sampler", "eulr"),
    ("steps", "abc"), ("n", 1.5), ("cfg_scale", "nan"),
])
def test_numeric_and_text_fields_beyond_their_bounds_are_refused_by_name(served, field, value):
    body = {"prompt": "a red circle", "steps": 2, field: value}
    r = served.post("/api/v1/jobs", json=body)
    detail = _refused(r)
    assert field.replace("_", " ") in detail.replace("_", " ") or field in detail, detail


def test_hires_steps_count_against_max_steps_on_both_apis(served):
    _refused(served.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "hires_scale": 2, "hires_steps": 999}),
             "hires_steps", "max_steps")
    _refused(served.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 32, "height": 32,
                                                    "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 999}),
             "max_steps")


@pytest.mark.parametrize(("extra", "field"), [
    ({"enable_hr": True, "hr_scale": "abc"}, "hr_scale"), ({"enable_hr": True, "hr_resize_x": "abc"}, "hr_resize_x"),
    ({"enable_hr": True, "hr_second_pass_steps": 1.5}, "hr_second_pass_steps"),
    ({"sampler_name": "Euler a", "eta": "abc"}, "eta"), ({"cfg_scale": 1e308}, "cfg_scale"),
    ({"seed": 2**70}, "seed"), ({"width": 10**9}, "width"), ({"prompt": "a\x00b"}, "prompt"),
])
def test_a1111_fields_are_checked_as_ours(served, extra, field):
    _refused(served.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, **extra}), field)


def test_a1111_controlnet_units_and_detect_are_bounded(served):
    unit = {"module": "canny", "image": PNG16, "processor_res": 4096}
    _refused(served.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "alwayson_scripts": {
        "controlnet": {"args": [unit]}}}), "processor_res")
    _refused(served.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [PNG16],
                                                     "controlnet_processor_res": 8192}), "controlnet_processor_res")
    _refused(served.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [PNG16],
                                                     "controlnet_threshold_a": "abc"}), "controlnet_threshold_a")
    _refused(served.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                     "controlnet_input_images": [PNG16] * 5}), "max_batch")
    ok = served.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [PNG16],
                                                 "controlnet_processor_res": 64})
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1


@pytest.mark.parametrize("image", ["bomb", "ztxt", "garbage", "notbase64"])
def test_hostile_images_are_4xx_everywhere(served, image):
    data = {"bomb": decompression_bomb(100_000, 100_000), "ztxt": ztxt_bomb(),
            "garbage": base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode(), "notbase64": "%%%"}[image]
    status = {"bomb": (413,)}.get(image, (422,))
    for r in (served.post("/sdapi/v1/png-info", json={"image": data}),
              served.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "init_images": [data]}),
              served.post("/api/v1/jobs", json={"kind": "img2img", "prompt": "x", "steps": 2, "init_image": data}),
              served.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [data]}),
              served.post("/api/v1/upscale", json={"images": [data], "scale": 2, "upscaler": "Lanczos"})):
        _refused(r, status=status)


def test_two_sizes_of_bomb_get_one_status_and_one_message(served):
    pillows = served.post("/sdapi/v1/png-info", json={"image": decompression_bomb(20_000, 20_000)})  # 400 Mpx
    ours = served.post("/sdapi/v1/png-info", json={"image": decompression_bomb(1000, 1000)})  # over max_input_pixels
    assert pillows.status_code == ours.status_code == 413 and pillows.json() == ours.json()


def test_a_lone_surrogate_is_a_422_in_valid_json(served):
    r = served.post("/api/v1/jobs", content=b'{"prompt": "red \\ud800", "steps": 2}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and "prompt" in r.json()["detail"]
    r.content.decode("ascii")  # escaped, so any client can read it


@pytest.mark.parametrize("outside", ["/etc/shadow", "/etc/no-such-file", "../../../etc/passwd", "/etc"])
def test_names_never_reach_outside_the_models_folder_nor_say_what_exists(served, outside):
    answers = [
        served.post("/api/v1/jobs", json={"prompt": f"x <lora:{outside}:1>", "steps": 2}),
        served.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "loras": [{"name": outside}]}),
        served.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "controls": [{"image": PNG16, "model": outside}]}),
        served.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "image_prompts": [{"image": PNG16,
                                                                                         "model": outside}]}),
        served.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "hires_scale": 2, "hires_upscaler": outside}),
        served.post("/api/v1/upscale", json={"images": [PNG16], "scale": 2, "upscaler": outside}),
        served.post("/sdapi/v1/txt2img", json={"prompt": f"x <lora:{outside}:1>", "steps": 2}),
    ]
    for r in answers:
        detail = _refused(r)
        for leak in ("pickle", "not a file or folder", "Permission", "Errno", str(served.models)):
            assert leak not in detail, (outside, detail)


def test_a_control_model_folder_without_its_config_is_a_4xx(served):
    _refused(served.post("/api/v1/jobs", json={"prompt": "x", "steps": 2,
                                               "controls": [{"image": PNG16, "model": "no-config"}]}), "no-config")


def test_one_client_cannot_break_the_options_of_every_other(served):
    for body, word in (({"CLIP_stop_at_last_layers": 1000}, "CLIP_stop_at_last_layers"),
                       ({"eta_noise_seed_delta": 10**30}, "eta_noise_seed_delta"),
                       ({"CLIP_stop_at_last_layers": "2"}, "CLIP_stop_at_last_layers"),
                       ({"sd_model_checkpoint": "b", "CLIP_stop_at_last_layers": 0}, "CLIP_stop_at_last_layers")):
        _refused(served.post("/sdapi/v1/options", json=body), word)
    assert served.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("a")  # nothing half-applied
    r = served.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2})
    assert r.status_code == 200, r.text


def test_upscales_are_bounded_and_queued(served):
    _refused(served.post("/api/v1/upscale", json={"images": [PNG16], "scale": 16, "upscaler": "shapes-sr"}),
             "max_pixels", status=(413,))
    _refused(served.post("/sdapi/v1/extra-single-image", json={"image": PNG16, "upscaling_resize": 8,
                                                               "upscaler_1": "shapes-sr"}), "max_pixels")
    _refused(served.post("/api/v1/upscale", json={"images": [PNG16] * 5, "scale": 2, "upscaler": "Lanczos"}),
             "max_batch")
    r = served.post("/api/v1/upscale", json={"images": [PNG16], "scale": 2, "upscaler": "Lanczos"})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    kinds = [row[0] for row in served.service.queue.store._db.execute("SELECT kind FROM jobs")]
    assert "upscale" in kinds and "detect" in kinds  # they waited their turn in the queue


def test_merges_of_one_name_at_once_give_one_model_and_409s(served):
    _refused(served.post("/api/v1/merge", json={"primary": "a", "secondary": "b", "name": "x-training"}),
             "-training")
    statuses = []

    def merge():
        statuses.append(served.post("/api/v1/merge", json={"primary": "a", "secondary": "b", "name": "ab"}).status_code)

    threads = [threading.Thread(target=merge) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 409, 409], statuses


def test_after_all_that_the_server_serves_and_its_memory_is_bounded(served):
    before = _rss()
    for _ in range(3):
        served.post("/sdapi/v1/png-info", json={"image": ztxt_bomb()})
        served.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [PNG16],
                                                "controlnet_processor_res": 8192})
        served.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "hires_scale": 2, "hires_steps": 999})
    assert _rss() - before < 300 * 2**20
    r = served.post("/api/v1/jobs", json={"prompt": "a red circle", "steps": 2})
    assert r.status_code == 202


# ---- the CLI
def test_cli_refuses_hostile_input_in_one_line(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(base64.b64decode(decompression_bomb(100_000, 100_000)))
    out = tmp_path / "out"
    runner = CliRunner()
    for args, word in ((["img2img", str(bomb), "x"], "too large"),
                       (["generate", "x", "--cfg", "1e308", "--out", str(out)], "cfg_scale"),
                       (["generate", "x", "--seed", "-5", "--out", str(out)], "seed"),
                       (["generate", "x", "--seed", str(2**63 - 1), "--n", "2", "--out", str(out)], "seed"),
                       (["generate", "x\x00y", "--out", str(out)], "NUL"),
                       (["info", str(bomb)], "cannot read")):
        result = runner.invoke(cli_app, args)
        assert result.exit_code == 2, (args, result.output)
        line = result.stderr.strip()
        assert line.startswith("error: ") and "\n" not in line and word in line, (args, line)
    assert not out.exists() or not list(out.iterdir())
    result = runner.invoke(cli_app, ["generate", "a red circle", "--seed", "-1", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0 and "seed: " in result.stderr  # -1: a random seed, said


def test_serve_takes_its_credentials_from_the_environment_or_a_file(tmp_path, monkeypatch):
    seen = {}

    def fake_run(app, **kwargs):
        seen["app"] = app

    monkeypatch.setattr("uvicorn.run", fake_run)
    (tmp_path / "auth").write_text("me:secret\n")
    runner = CliRunner()
    for args, env in ((["serve", "--api-auth-file", str(tmp_path / "auth")], {}),
                      (["serve"], {"IMAGINE_API_AUTH": "me:secret"})):
        seen.clear()
        result = runner.invoke(cli_app, args, env=env)
        assert result.exit_code == 0, result.output
        client = TestClient(seen["app"])
        assert client.get("/api/v1/status").status_code == 401
        assert client.get("/api/v1/status", auth=("me", "secret")).status_code == 200
