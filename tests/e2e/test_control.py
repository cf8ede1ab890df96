"""Spatial control end to end: train-controlnet / train-adapter (exact resume), the CLI's --control and
--adapter with --from, imagine detect, the job API's controls and A1111's ControlNet extension API."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file

from imagine.data.shapes import make_scene, render
from imagine.server import Limits, create_app
from tests.e2e.inprocess import imagine


def _b64(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def trained(tiny_t2i_dir, tmp_path_factory):
    """A models folder with a ControlNet and a T2I-Adapter trained for a few steps on the tiny model."""
    root = tmp_path_factory.mktemp("control")
    models = root / "models" / "ControlNet"
    common = ["--model", tiny_t2i_dir, "--data", "builtin:shapes", "--steps", 4, "--batch-size", 2,
              "--checkpoint-every", 2]
    run = imagine("train-controlnet", "--condition", "segmentation", "--out", models / "cn_seg", *common)
    assert run.returncode == 0, run.stderr[-3000:]
    run = imagine("train-adapter", "--condition", "canny", "--out", models / "ad_canny", "--num-res-blocks", 1,
                  *common)
    assert run.returncode == 0, run.stderr[-3000:]
    scene = root / "scene.png"
    Image.fromarray(render(make_scene(3), 64)).save(scene)
    return root


def test_training_resumes_exactly_and_writes_diffusers_folders(trained, tiny_t2i_dir, tmp_path):
    straight = load_file(str(trained / "models" / "ControlNet" / "cn_seg" / "diffusion_pytorch_model.safetensors"))
    common = ["--model", tiny_t2i_dir, "--condition", "segmentation", "--batch-size", 2, "--checkpoint-every", 2,
              "--out", tmp_path / "cn"]
    assert imagine("train-controlnet", "--steps", 2, *common).returncode == 0
    (tmp_path / "cn").rename(tmp_path / "cn-half")  # the half-way result; the run goes on from its checkpoint
    run = imagine("train-controlnet", "--steps", 4, "--resume", *common)
    assert run.returncode == 0, run.stderr[-2000:]
    resumed = load_file(str(tmp_path / "cn" / "diffusion_pytorch_model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(np.array_equal(straight[k].numpy(), resumed[k].numpy()) for k in straight)
    assert (trained / "models" / "ControlNet" / "cn_seg-training" / "samples" / "step_0000004.png").exists()
    run = imagine("train-controlnet", "--model", tiny_t2i_dir, "--condition", "depth", "--out", tmp_path / "x")
    assert run.returncode != 0 and "preprocessor 'depth' unknown" in run.stderr


def test_cli_control_units_detect_and_from(trained, tiny_t2i_dir):
    cwd = trained
    assert imagine("detect", "canny", "scene.png", "--out", "edges.png", cwd=cwd).returncode == 0
    assert Image.open(trained / "edges.png").info.get("imagine-condition") == "canny"
    common = ["--model", tiny_t2i_dir, "--steps", 3, "--width", 16, "--height", 16, "--seed", 5]
    run = imagine("generate", "a red circle", *common, "--out", "base", cwd=cwd)
    assert run.returncode == 0, run.stderr[-2000:]
    run = imagine("generate", "a red circle", *common, "--control", "segmentation:scene.png:0.8:0:0.7",
                  "--adapter", "canny:edges.png:0.5", "--control-mode", "prompt", "--out", "ctl", cwd=cwd)
    assert run.returncode == 0, run.stderr[-2000:]
    out = trained / "ctl" / "000005-txt2img.png"
    text = Image.open(out).info["parameters"]
    assert 'ControlNet 0: "Module: segmentation, Model: cn_seg [' in text and "Guidance End: 0.7" in text
    assert 'ControlNet 1: "Module: canny, Model: ad_canny [' in text and "My prompt is more important" in text
    base = np.asarray(Image.open(trained / "base" / "000005-txt2img.png"))
    assert not np.array_equal(np.asarray(Image.open(out)), base)  # the units changed the image
    run = imagine("generate", "--from", out, "--out", "again", cwd=cwd)
    assert run.returncode == 0, run.stderr[-2000:]
    again = np.asarray(Image.open(trained / "again" / "000005-txt2img.png"))
    assert np.array_equal(again, np.asarray(Image.open(out)))
    # refusals that teach
    run = imagine("generate", "x", *common, "--control", "scribble:scene.png", "--out", "bad", cwd=cwd)
    assert run.returncode != 0 and "no ControlNet for 'scribble'" in run.stderr
    run = imagine("generate", "x", *common, "--control", "canny@cn_seg:scene.png:1:0.9:0.1", "--out", "bad", cwd=cwd)
    assert run.returncode != 0 and "0 <= start <= end <= 1" in run.stderr
    run = imagine("generate", "x", *common, "--control", "segmentation:scene.png", "--tile", 32, "--out", "bad",
                  cwd=cwd)  # refused by the request's check, before any model work
    assert run.returncode != 0 and "tiled sampling does not take ControlNet" in run.stderr
    run = imagine("img2img", "scene.png", "a blue square", *common, "--strength", 0.6, "--control",
                  "segmentation:scene.png", "--out", "i2i", cwd=cwd)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.fixture(scope="module")
def client(trained, tiny_t2i_dir, tmp_path_factory):
    app = create_app([tiny_t2i_dir], out_dir=tmp_path_factory.mktemp("out"), models_dir=trained / "models",
                     limits=Limits(max_steps=50, max_batch=4, max_pixels=64 * 64))
    with TestClient(app) as c:
        yield c


def test_a1111_controlnet_extension_api(client, trained):
    scene = Image.open(trained / "scene.png")
    assert client.get("/controlnet/version").json() == {"version": 2}
    models = client.get("/controlnet/model_list").json()["model_list"]
    assert any(m.startswith("cn_seg [") for m in models) and any(m.startswith("ad_canny [") for m in models)
    assert not any("training" in m for m in models)  # a run's checkpoints are not models
    modules = client.get("/controlnet/module_list").json()
    assert {"canny", "segmentation", "scribble", "keypoints", "tile", "none"} <= set(modules["module_list"])
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                "controlnet_input_images": [_b64(scene)]})
    assert r.status_code == 200, r.text
    edges = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
    assert edges.shape == (64, 64, 3) and 0 < (edges > 0).mean() < 0.2
    model = next(m for m in models if m.startswith("cn_seg ["))
    unit = {"enabled": True, "image": _b64(scene), "module": "seg_ofade20k", "model": model, "weight": 0.9,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": 1, "resize_mode": "Crop and Resize",
            "processor_res": -1, "threshold_a": -1, "threshold_b": -1, "pixel_perfect": True}
    body = {"prompt": "a red circle", "steps": 3, "width": 16, "height": 16, "seed": 2,
            "alwayson_scripts": {"controlnet": {"args": [unit, {"enabled": False}]}}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = r.json()["info"]
    assert "ControlNet 0" in info and "Module: segmentation" in info and "My prompt is more important" in info
    # img2img with a unit without an image reads the init image
    r = client.post("/sdapi/v1/img2img", json={**body, "init_images": [_b64(scene)], "denoising_strength": 0.5,
                                               "alwayson_scripts": {"controlnet": {"args": [{**unit, "image": None}]}}})
    assert r.status_code == 200, r.text
    # bad units: 4xx naming the field
    for bad, field in [({**unit, "weight": "heavy"}, "args[0]"), ({**unit, "module": "depth_midas"}, "depth_midas"),
                       ({**unit, "mask": _b64(scene)}, "args[0].mask"), ({**unit, "bogus": 1}, "bogus"),
                       ({**unit, "model": "nope"}, "nope"), ({**unit, "guidance_start": 0.9, "guidance_end": 0.1},
                                                            "start")]:
        r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [bad]}}})
        assert 400 <= r.status_code < 500 and field in r.text, (field, r.status_code, r.text)
    r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"adetailer": {"args": []}}})
    assert r.status_code == 422 and "alwayson_scripts.adetailer" in r.text


def test_job_api_controls(client, trained):
    scene = _b64(Image.open(trained / "scene.png"))
    r = client.post("/api/v1/jobs", json={"prompt": "a red circle", "steps": 3, "width": 16, "height": 16,
                                          "controls": [{"image": scene, "module": "segmentation", "weight": 0.8},
                                                       {"image": scene, "module": "canny", "kind": "t2i_adapter"}]})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    for _ in range(600):
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            break
        import time

        time.sleep(0.05)
    assert job["status"] == "done", job["error"]
    record = job["images"][0]["info"]
    assert [u["model"] for u in record["controls"]] == ["cn_seg", "ad_canny"]
    assert all("image" not in u for u in job["request"]["controls"])  # the job keeps no input images
    r = client.post("/api/v1/jobs", json={"prompt": "x", "controls": [{"image": scene, "module": "canny",
                                                                       "mode": "loud"}]})
    assert r.status_code == 422 and "controls[0]" in r.text and "loud" in r.text


def test_tile_controlnet_upscales_in_hires_fix(trained, tiny_t2i_dir, tmp_path):
    """Hires fix with a tile ControlNet: the image upscaled with Lanczos steers its own second pass; listed
    among the upscalers once a tile ControlNet is in the models folder, refused where no second pass runs."""
    import shutil

    from imagine.a1111 import parse_a1111
    from imagine.io.png import read_png_metadata
    from imagine.pipelines.upscale import upscaler_names

    models = tmp_path / "models"
    shutil.copytree(trained / "models", models)
    assert "Tile ControlNet" not in upscaler_names(models)
    run = imagine("train-controlnet", "--condition", "tile", "--out", models / "ControlNet" / "cn_tile", "--model",
                  tiny_t2i_dir, "--data", "builtin:shapes", "--steps", 2, "--batch-size", 2)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Tile ControlNet" in upscaler_names(models)
    common = ["--model", tiny_t2i_dir, "--steps", 2, "--seed", 4, "--models-dir", models]
    run = imagine("generate", "a red circle", *common, "--hires", 2, "--hires-upscaler", "Tile ControlNet",
                  "--hires-strength", 0.6, "--out", "a", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "a" / "000004-txt2img.png"
    assert Image.open(out).size == (32, 32)
    text, record = read_png_metadata(out)
    assert parse_a1111(text)["Hires upscaler"] == "Tile ControlNet"
    assert record["upscaler"]["kind"] == "tile" and record["upscaler"]["path"].endswith("cn_tile")
    run = imagine("generate", "--from", out, "--models-dir", models, "--out", "b", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "000004-txt2img.png")), np.asarray(Image.open(out)))
    run = imagine("generate", "x", *common, "--hires", 2, "--hires-upscaler", "Tile ControlNet", "--hires-strength", 0,
                  "--out", "c", cwd=tmp_path)
    assert run.returncode != 0 and "needs a second pass" in run.stderr
    run = imagine("upscale", out, "--upscaler", "Tile ControlNet", "--models-dir", models, "--out", "d", cwd=tmp_path)
    assert run.returncode != 0 and "second pass with the base model" in run.stderr


def test_an_mmdit_trains_and_takes_a_controlnet_made_for_it(trained, tmp_path):
    """The transformer ControlNet (PixArt-delta's and SD3's design: the first blocks copied, zero linear
    outputs added after the base's blocks): train-controlnet on an MMDiT writes diffusers' SD3ControlNetModel
    (diffusers loads it and computes the same), --control uses it and --from reproduces; a UNet's ControlNet
    is refused on the MMDiT, naming what it was made for."""
    import shutil

    import torch

    from imagine.io.control_files import load_control

    diffusers = pytest.importorskip("diffusers")
    mm = tmp_path / "mmdit"
    run = imagine("train", "--data", "builtin:shapes-language", "--preset", "tiny-t2i", "--arch", "mmdit",
                  "--prediction", "flow", "--steps", 3, "--out", mm)
    assert run.returncode == 0, run.stderr[-2000:]
    net_dir = tmp_path / "models" / "ControlNet" / "mm_seg"
    run = imagine("train-controlnet", "--model", mm, "--data", "builtin:shapes", "--condition", "segmentation",
                  "--steps", 3, "--batch-size", 2, "--out", net_dir)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = load_control(net_dir)
    assert ours.network == "mmdit" and type(ours.model).__name__ == "SD3ControlNetModel"
    theirs = diffusers.SD3ControlNetModel.from_pretrained(net_dir).eval()
    cfg = ours.model.config
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, cfg.in_channels, 8, 8, generator=g), torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    text, pooled = torch.randn(1, 4, cfg.joint_attention_dim, generator=g), torch.randn(1, cfg.pooled_projection_dim,
                                                                                       generator=g)
    with torch.no_grad():
        want = theirs(x, controlnet_cond=cond, encoder_hidden_states=text, pooled_projections=pooled,
                      timestep=torch.tensor([500.0])).controlnet_block_samples
        got = ours.model(x, torch.tensor([500.0]), text, pooled, cond)
    assert max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True)) < 1e-5
    shutil.copy(trained / "scene.png", tmp_path / "scene.png")
    common = ["--model", mm, "--steps", 3, "--seed", 5, "--sampler", "euler"]
    run = imagine("generate", "a red circle", *common, "--control", "segmentation:scene.png:0.8", "--out", "ctl",
                  cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    out = next((tmp_path / "ctl").glob("*.png"))
    assert 'ControlNet 0: "Module: segmentation, Model: mm_seg [' in Image.open(out).info["parameters"]
    run = imagine("generate", "--from", out, "--out", "again", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(next((tmp_path / "again").glob("*.png")))), np.asarray(Image.open(out)))
    shutil.copytree(trained / "models" / "ControlNet" / "cn_seg", tmp_path / "models" / "ControlNet" / "cn_seg")
    run = imagine("generate", "x", *common, "--control", "segmentation@cn_seg:scene.png", "--out", "bad",
                  cwd=tmp_path)
    assert run.returncode != 0 and "made for unet models" in run.stderr
