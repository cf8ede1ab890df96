"""Stable Diffusion checkpoints through the three doors, as a user with an A1111 models folder would use
them: `imagine generate --model FOLDER_OR_FILE_OR_NAME [--vae]`, `imagine convert`, `imagine models`,
and /sdapi/v1/txt2img with sd_model_checkpoint and sd_vae. Tiny random SD 1.x, 2.x and SDXL models."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

pytest.importorskip("diffusers")
from safetensors.torch import load_file, save_file

from imagine.io.png import read_png_metadata
from tests.e2e.inprocess import imagine
from tests.tiny_sd import write_pipeline

_imagine = imagine  # in-process (tests/e2e/inprocess.py)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A working folder with three diffusers pipelines and an A1111 models folder: SD 1.x and SDXL single
    files (converted by `imagine convert`) and a separate VAE."""
    root = tmp_path_factory.mktemp("sd")
    for arch in ("sd1", "sd2", "sdxl"):
        write_pipeline(arch, root / f"{arch}-pipe", seed={"sd1": 0, "sd2": 1, "sdxl": 2}[arch])
    ckpts = root / "models" / "Stable-diffusion"
    ckpts.mkdir(parents=True)
    for arch, dtype in (("sd1", "fp32"), ("sdxl", "fp16")):
        run = _imagine("convert", root / f"{arch}-pipe", ckpts / f"tiny-{arch}.safetensors", "--dtype", dtype)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "(single-file)" in run.stdout
    (root / "models" / "VAE").mkdir()
    tensors = load_file(ckpts / "tiny-sd1.safetensors")  # an A1111-style VAE file: the original layout, no prefix
    vae = {k.removeprefix("first_stage_model."): v for k, v in tensors.items() if k.startswith("first_stage_model.")}
    save_file(vae, root / "models" / "VAE" / "tiny-vae.safetensors")
    return root


@pytest.mark.parametrize("model", ["sd2-pipe", "sdxl-pipe", "tiny-sd1",
                                   "models/Stable-diffusion/tiny-sdxl.safetensors"])
def test_generate_runs_each_architecture_by_folder_file_or_name(workspace, model):
    run = _imagine("generate", "a red circle", "--model", model, "--steps", "2", "--out", "out", cwd=workspace)
    assert run.returncode == 0, run.stderr[-2000:]
    png = workspace / run.stdout.strip().splitlines()[-1]
    parameters, record = read_png_metadata(png)
    assert record["model"]["arch"] in ("sd1", "sd2", "sdxl")
    name = model.split("/")[-1].removesuffix(".safetensors")
    assert "Model hash: " in parameters and f"Model: {name}" in parameters
    assert Image.open(png).size == (16, 16)  # the model's own size: sample_size 8 x VAE factor 2


def test_vae_override_is_recorded_and_from_reproduces_it(workspace):
    run = _imagine("generate", "a cat", "--model", "tiny-sd1", "--vae", "tiny-vae", "--steps", "2", "--seed", "7",
                   "--out", "vae-out", cwd=workspace)
    assert run.returncode == 0, run.stderr[-2000:]
    first = workspace / run.stdout.strip().splitlines()[-1]
    parameters, record = read_png_metadata(first)
    assert "VAE: tiny-vae.safetensors" in parameters and "VAE hash: " in parameters
    assert record["model"]["vae"].endswith("tiny-vae.safetensors")
    again = _imagine("generate", "--from", first, "--out", "vae-out", cwd=workspace)
    assert again.returncode == 0, again.stderr[-2000:]
    second = workspace / again.stdout.strip().splitlines()[-1]
    assert second != first and second.read_bytes() == first.read_bytes()


def test_bf16_weights_are_recorded_and_from_reproduces_them(workspace):
    run = _imagine("generate", "a cat", "--model", "sdxl-pipe", "--weights-dtype", "bf16", "--precision", "bf16",
                   "--steps", "2", "--out", "bf16-out", cwd=workspace)
    assert run.returncode == 0, run.stderr[-2000:]
    first = workspace / run.stdout.strip().splitlines()[-1]
    assert read_png_metadata(first)[1]["weights_dtype"] == "bfloat16"
    again = _imagine("generate", "--from", first, "--out", "bf16-out", cwd=workspace)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (workspace / again.stdout.strip().splitlines()[-1]).read_bytes() == first.read_bytes()
    fp32 = _imagine("generate", "a cat", "--model", "sdxl-pipe", "--weights-dtype", "bf16", cwd=workspace)
    assert fp32.returncode == 2 and "loaded with bf16 weights" in fp32.stderr


def test_models_lists_architecture_size_and_hash(workspace):
    run = _imagine("models", "--json", cwd=workspace)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(run.stdout)}
    assert rows["tiny-sd1"]["arch"] == "sd1" and rows["tiny-sdxl"]["arch"] == "sdxl"
    assert rows["tiny-vae"]["section"] == "vae"
    assert all(len(r["hash"]) == 10 and r["bytes"] > 0 for r in rows.values())


def test_convert_refuses_what_it_cannot_do(workspace):
    exists = _imagine("convert", "sd1-pipe", "models/Stable-diffusion/tiny-sd1.safetensors", cwd=workspace)
    assert exists.returncode == 2 and "exists" in exists.stderr
    ckpt = _imagine("convert", "nowhere.ckpt", "x.safetensors", cwd=workspace)
    assert ckpt.returncode == 2 and "no model at nowhere.ckpt" in ckpt.stderr
    missing = _imagine("generate", "a cat", "--model", "tiny-sd3", cwd=workspace)
    assert missing.returncode == 2 and "no checkpoints named 'tiny-sd3'" in missing.stderr
    assert "there are: tiny-sd1, tiny-sdxl" in missing.stderr


def test_a1111_api_serves_the_models_folder(workspace, monkeypatch):
    from fastapi.testclient import TestClient

    from imagine.io import models_dir as md
    from imagine.server import create_app

    monkeypatch.chdir(workspace)
    folder = md.default_models_dir()
    paths = [e.path for e in md.entries(folder, "checkpoints")] + [workspace / "sd2-pipe"]
    app = create_app(paths, out_dir=None, vaes=[e.path for e in md.entries(folder, "vae")])
    with TestClient(app) as client:
        titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
        assert [t.split(" [")[0] for t in titles] == ["tiny-sd1", "tiny-sdxl", "sd2-pipe"]
        assert [v["model_name"] for v in client.get("/sdapi/v1/sd-vae").json()] == ["tiny-vae"]
        for name in ("tiny-sdxl", "sd2-pipe", titles[0]):
            r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "seed": 3,
                                                      "override_settings": {"sd_model_checkpoint": name}})
            assert r.status_code == 200, r.text
            info = json.loads(r.json()["info"])
            assert info["sd_model_name"] == name.split(" [")[0]
            png = base64.b64decode(r.json()["images"][0])
            assert Image.open(io.BytesIO(png)).size == (16, 16)
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "override_settings": {
            "sd_model_checkpoint": "tiny-sd1", "sd_vae": "tiny-vae"}})
        assert r.status_code == 200, r.text
        assert "VAE: tiny-vae.safetensors" in json.loads(r.json()["info"])["infotexts"][0]
        bad = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "override_settings": {"sd_vae": "nope"}})
        assert bad.status_code == 404 and "choose Automatic or one of: tiny-vae" in bad.json()["detail"]
        assert client.post("/sdapi/v1/options", json={"sd_vae": "nope"}).status_code == 400
        ours = client.get("/api/v1/models").json()
        assert ours["vaes"] == ["tiny-vae"] and len(ours["models"]) == 3
