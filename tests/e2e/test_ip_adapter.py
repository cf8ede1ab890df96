"""Image prompts end to end: train-ip-adapter (exact resume), --image-prompt with --from, imagine variations,
the job API's image_prompts and /api/v1/variations, A1111's ControlNet-extension IP-Adapter units."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file

from imagine.data.shapes import make_scene, render
from imagine.server import Limits, create_app

from .test_control import _b64, imagine


@pytest.fixture(scope="module")
def trained(tiny_t2i_dir, tmp_path_factory):
    """A models folder with a content and a palette IP-Adapter trained for a few steps on the tiny model."""
    root = tmp_path_factory.mktemp("ip")
    folder = root / "models" / "ipadapter"
    common = ["--model", tiny_t2i_dir, "--data", "builtin:shapes", "--steps", 4, "--batch-size", 2,
              "--checkpoint-every", 2]
    run = imagine("train-ip-adapter", "--out", folder / "ip_content.safetensors", *common)
    assert run.returncode == 0, run.stderr[-3000:]
    run = imagine("train-ip-adapter", "--image-encoder", "palette", "--out", folder / "ip_palette.safetensors",
                  *common)
    assert run.returncode == 0, run.stderr[-3000:]
    Image.fromarray(render(make_scene(3), 64)).save(root / "ref.png")
    Image.fromarray(render(make_scene(8), 64)).save(root / "colours.png")
    return root


def test_training_resumes_exactly(trained, tiny_t2i_dir, tmp_path):
    straight = load_file(str(trained / "models" / "ipadapter" / "ip_content.safetensors"))
    assert any(k.startswith("image_proj.proj.") for k in straight) and "ip_adapter.1.to_k_ip.weight" in straight
    common = ["--model", tiny_t2i_dir, "--batch-size", 2, "--checkpoint-every", 2, "--out", tmp_path / "ip.safetensors"]
    assert imagine("train-ip-adapter", "--steps", 2, *common).returncode == 0
    (tmp_path / "ip.safetensors").rename(tmp_path / "half.safetensors")
    run = imagine("train-ip-adapter", "--steps", 4, "--resume", *common)
    assert run.returncode == 0, run.stderr[-2000:]
    resumed = load_file(str(tmp_path / "ip.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(np.array_equal(straight[k].numpy(), resumed[k].numpy()) for k in straight)
    assert (trained / "models" / "ipadapter" / "ip_content-training" / "samples" / "step_0000004.png").exists()


def test_cli_image_prompts_variations_and_from(trained, tiny_t2i_dir):
    cwd = trained
    common = ["--model", tiny_t2i_dir, "--steps", 3, "--width", 16, "--height", 16, "--seed", 5]
    run = imagine("generate", "a red circle", *common, "--out", "base", cwd=cwd)
    assert run.returncode == 0, run.stderr[-2000:]
    run = imagine("generate", "a red circle", *common, "--image-prompt", "ref.png:0.7", "--image-prompt",
                  "palette:colours.png:0.5:0:0.8", "--out", "ip", cwd=cwd)
    assert run.returncode == 0, run.stderr[-2000:]
    out = trained / "ip" / "000005-txt2img.png"
    text = Image.open(out).info["parameters"]
    assert 'ControlNet 0: "Module: ip-adapter_shapes_clip, Model: ip_content [' in text and "Weight: 0.7" in text
    assert 'ControlNet 1: "Module: ip-adapter_palette, Model: ip_palette [' in text and "Guidance End: 0.8" in text
    base = np.asarray(Image.open(trained / "base" / "000005-txt2img.png"))
    assert not np.array_equal(np.asarray(Image.open(out)), base)  # the image prompts changed the image
    run = imagine("generate", "--from", out, "--out", "again", cwd=cwd)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(trained / "again" / "000005-txt2img.png")),
                          np.asarray(Image.open(out)))
    # scale 0: the base model's pixels exactly
    run = imagine("generate", "a red circle", *common, "--image-prompt", "ref.png:0", "--out", "zero", cwd=cwd)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(trained / "zero" / "000005-txt2img.png")), base)
    # variations: the image alone, n of them, each reproducible
    run = imagine("variations", "ref.png", "--n", 2, "--model", tiny_t2i_dir, "--steps", 3, "--width", 16,
                  "--height", 16, "--out", "var", cwd=cwd)
    assert run.returncode == 0, run.stderr[-2000:]
    made = sorted((trained / "var").glob("*.png"))
    assert len(made) == 2
    run = imagine("img2img", "ref.png", "", *common, "--strength", 0.6, "--image-prompt", "ref.png", "--out", "i2i",
                  cwd=cwd)
    assert run.returncode == 0, run.stderr[-2000:]
    # refusals that teach
    run = imagine("generate", "x", *common, "--image-prompt", "intensity:ref.png", "--out", "bad", cwd=cwd)
    assert run.returncode != 0 and "no intensity IP-Adapter" in run.stderr
    run = imagine("generate", "x", *common, "--image-prompt", "ref.png:1:0.9:0.1", "--out", "bad", cwd=cwd)
    assert run.returncode != 0 and "0 <= start <= end <= 1" in run.stderr
    run = imagine("generate", "x", *common, "--image-prompt", "missing.png", "--out", "bad", cwd=cwd)
    assert run.returncode != 0 and "missing.png" in run.stderr


@pytest.fixture(scope="module")
def client(trained, tiny_t2i_dir, tmp_path_factory):
    app = create_app([tiny_t2i_dir], out_dir=tmp_path_factory.mktemp("out"), models_dir=trained / "models",
                     limits=Limits(max_steps=50, max_batch=4, max_pixels=64 * 64))
    with TestClient(app) as c:
        yield c


def _wait(client, job_id):
    for _ in range(1200):
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_job_api_image_prompts_and_variations(client, trained):
    ref = _b64(Image.open(trained / "ref.png"))
    listed = client.get("/api/v1/ip-adapters").json()["ip_adapters"]
    assert {"ip_content": "content", "ip_palette": "palette"}.items() <= {
        a["title"].split(" [")[0]: a["type"] for a in listed}.items()
    r = client.post("/api/v1/jobs", json={"prompt": "", "steps": 3, "width": 16, "height": 16, "seed": 1,
                                          "image_prompts": [{"image": ref, "scale": 0.8},
                                                            {"image": ref, "type": "palette", "scale": 0.3}]})
    assert r.status_code == 202, r.text
    job = _wait(client, r.json()["id"])
    assert job["status"] == "done", job["error"]
    record = job["images"][0]["info"]
    assert [(p["model"], p["scale"]) for p in record["image_prompts"]] == [("ip_content", 0.8), ("ip_palette", 0.3)]
    assert all("image" not in p for p in job["request"]["image_prompts"])  # the job keeps no input images
    r = client.post("/api/v1/variations", json={"image": ref, "n": 2, "steps": 3, "seed": 4})
    assert r.status_code == 202, r.text
    job = _wait(client, r.json()["id"])
    assert job["status"] == "done", job["error"] and len(job["images"]) == 2
    assert job["images"][1]["info"]["image_prompts"][0]["model"] == "ip_content"
    for bad, field in [({"image": ref, "type": "shape"}, "type"), ({"scale": 1}, "image"),
                       ({"image": ref, "start": 0.9, "end": 0.1}, "start"), ({"image": "nope"}, "image_prompts[0]")]:
        r = client.post("/api/v1/jobs", json={"prompt": "x", "steps": 3, "image_prompts": [bad]})
        assert 400 <= r.status_code < 500 and field in r.text, (field, r.status_code, r.text)


def test_a1111_ip_adapter_units(client, trained):
    ref = _b64(Image.open(trained / "ref.png"))
    models = client.get("/controlnet/model_list").json()["model_list"]
    model = next(m for m in models if m.startswith("ip_content ["))
    assert "ip-adapter_clip" in client.get("/controlnet/module_list").json()["module_list"]
    unit = {"enabled": True, "image": ref, "module": "ip-adapter_clip_sd15", "model": model, "weight": 0.6,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": 0, "resize_mode": "Crop and Resize",
            "processor_res": -1, "threshold_a": -1, "threshold_b": -1, "pixel_perfect": False}
    body = {"prompt": "", "steps": 3, "width": 16, "height": 16, "seed": 2,
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = r.json()["info"]
    assert "ControlNet 0" in info and "Module: ip-adapter_shapes_clip" in info and "Weight: 0.6" in info
    r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
        {**unit, "image": None}]}}})
    assert r.status_code in (400, 422) and "reference image" in r.text
