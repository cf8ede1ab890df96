"""LoRAs at generation, through every door: `--lora NAME[:WEIGHT]`, A1111's <lora:NAME:WEIGHT> in the
prompt, `imagine merge-lora`, the job API's `loras` and /sdapi/v1/loras, each recorded in the PNG
(`Lora hashes`) so `--from` draws the same image again."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.adapters.lora import create
from imagine.io.lora_keys import save_lora
from imagine.io.networks import load_unet
from imagine.io.png import read_png_metadata
from tests.e2e.inprocess import imagine

_imagine = imagine  # in-process (tests/e2e/inprocess.py)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def workspace(tiny_t2i_dir, tmp_path_factory):
    """A working folder whose models/Lora/ holds a LoRA (kohya layout) for the tiny text-to-image model."""
    root = tmp_path_factory.mktemp("lora-use")
    unet = load_unet(tiny_t2i_dir / "unet")
    lora = create({"unet": unet}, rank=4, targets="all")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=g) * 1.5)
    (root / "models" / "Lora").mkdir(parents=True)
    save_lora(lora, root / "models" / "Lora" / "sks-style.safetensors")
    return root


def _generate(workspace, model, *extra, prompt="a red circle"):
    run = _imagine("generate", prompt, "--model", model, "--steps", "4", "--seed", "5", "--out", "out", *extra,
                   cwd=workspace)
    assert run.returncode == 0, run.stderr[-2000:]
    return workspace / run.stdout.strip().splitlines()[-1]


def test_lora_option_tag_weight_zero_and_from(workspace, tiny_t2i_dir):
    base = _generate(workspace, tiny_t2i_dir)
    zero = _generate(workspace, tiny_t2i_dir, "--lora", "sks-style:0")
    assert np.array_equal(_pixels(zero), _pixels(base))  # weight 0: the base model's pixels
    full = _generate(workspace, tiny_t2i_dir, "--lora", "sks-style:1")
    assert np.abs(_pixels(full) - _pixels(base)).max() > 5
    tagged = _generate(workspace, tiny_t2i_dir, prompt="a red circle <lora:sks-style:1>")
    assert np.array_equal(_pixels(tagged), _pixels(full))  # the tag is taken out of the text, the LoRA applied
    for png, source in ((full, "option"), (tagged, "prompt")):
        parameters, record = read_png_metadata(png)
        assert "Lora hashes: " in parameters and "sks-style: " in parameters
        assert record["loras"][0]["source"] == source and record["loras"][0]["weight"] == 1.0
        again = _imagine("generate", "--from", png, "--out", "again", cwd=workspace)
        assert again.returncode == 0, again.stderr[-2000:]
        assert np.array_equal(_pixels(workspace / again.stdout.strip().splitlines()[-1]), _pixels(png))
    missing = _imagine("generate", "a cat", "--model", tiny_t2i_dir, "--lora", "nope", cwd=workspace)
    assert missing.returncode == 2 and "no lora named 'nope'" in missing.stderr and "sks-style" in missing.stderr


def test_merge_lora_draws_what_the_attached_lora_draws(workspace, tiny_t2i_dir):
    merged = workspace / "merged"
    run = _imagine("merge-lora", "--model", tiny_t2i_dir, "--lora", "sks-style:0.7", "--out", merged, cwd=workspace)
    assert run.returncode == 0, run.stderr[-2000:]
    attached = _generate(workspace, tiny_t2i_dir, "--lora", "sks-style:0.7")
    folded = _generate(workspace, merged)
    assert np.abs(_pixels(folded) - _pixels(attached)).max() <= 2  # within 1e-4 before rounding to 8 bits


def test_server_applies_loras_from_the_job_api_and_prompt_tags(workspace, tiny_t2i_dir):
    from fastapi.testclient import TestClient

    from imagine.server import create_app

    app = create_app([tiny_t2i_dir], out_dir=None, models_dir=workspace / "models")
    with TestClient(app) as client:
        assert [lo["name"] for lo in client.get("/sdapi/v1/loras").json()] == ["sks-style"]
        assert client.post("/sdapi/v1/refresh-loras").status_code == 200
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle <lora:sks-style:1>", "steps": 4,
                                                  "seed": 5, "sampler_name": "Euler", "cfg_scale": 3})
        assert r.status_code == 200, r.text
        assert "Lora hashes: " in json.loads(r.json()["info"])["infotexts"][0]
        tagged = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        job = client.post("/api/v1/jobs", json={"kind": "txt2img", "prompt": "a red circle", "steps": 4, "seed": 5,
                                                "sampler": "euler", "cfg_scale": 3,
                                                "loras": [{"name": "sks-style", "weight": 1.0}]}).json()
        done = client.get(f"/api/v1/jobs/{job['id']}?wait=30").json()
        for _ in range(300):
            if done["status"] in ("done", "failed"):
                break
            done = client.get(f"/api/v1/jobs/{job['id']}").json()
        assert done["status"] == "done", done
        ours = np.asarray(Image.open(io.BytesIO(base64.b64decode(done["images"][0]["base64"]))).convert("RGB"))
        assert np.array_equal(ours, tagged)
        bad = client.post("/api/v1/jobs", json={"kind": "txt2img", "prompt": "x", "loras": [{"name": "nope"}]})
        assert bad.status_code == 422 and "no lora named 'nope'" in bad.json()["detail"]


def test_server_lists_and_uses_embeddings_by_the_name_in_the_prompt(workspace, tiny_t2i_dir):
    from fastapi.testclient import TestClient

    from imagine.adapters.embeddings import Embedding
    from imagine.io.embeddings import save_embedding
    from imagine.server import create_app

    folder = workspace / "models" / "embeddings"
    folder.mkdir(exist_ok=True)
    save_embedding(Embedding("x", {"emb_params": torch.randn(2, 384, generator=torch.Generator().manual_seed(0))}),
                   folder / "sks-thing.safetensors")
    save_embedding(Embedding("x", {"emb_params": torch.zeros(1, 768)}), folder / "for-sd15.safetensors")
    app = create_app([tiny_t2i_dir], out_dir=None, models_dir=workspace / "models")
    with TestClient(app) as client:
        listed = client.get("/sdapi/v1/embeddings").json()
        assert list(listed["loaded"]) == ["sks-thing"] and listed["loaded"]["sks-thing"]["vectors"] == 2
        assert listed["loaded"]["sks-thing"]["shape"] == 384 and list(listed["skipped"]) == ["for-sd15"]
        assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red sks-thing", "steps": 3, "seed": 5})
        assert r.status_code == 200, r.text
        assert 'TI hashes: "sks-thing: ' in json.loads(r.json()["info"])["infotexts"][0]
        wrong = client.post("/sdapi/v1/txt2img", json={"prompt": "a for-sd15", "steps": 3})
        assert wrong.status_code >= 400 and "SD 1.x's CLIP ViT-L" in wrong.text


def test_server_merges_served_models_into_a_new_one(workspace, tiny_t2i_dir, tmp_path):
    from fastapi.testclient import TestClient

    from imagine.server import create_app

    app = create_app([tiny_t2i_dir], out_dir=None, models_dir=tmp_path / "models")
    with TestClient(app) as client:
        r = client.post("/api/v1/merge", json={"primary": "tiny-shapes", "secondary": "tiny-shapes",
                                               "multiplier": 0.3, "name": "self-merge"})
        assert r.status_code == 200, r.text
        assert r.json()["name"] == "self-merge" and (tmp_path / "models" / "Stable-diffusion" / "self-merge").is_dir()
        assert "self-merge" in [m["name"] for m in client.get("/api/v1/models").json()["models"]]
        job = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2,
                                                    "override_settings": {"sd_model_checkpoint": "self-merge"}})
        assert job.status_code == 200, job.text
        again = client.post("/api/v1/merge", json={"primary": "tiny-shapes", "secondary": "tiny-shapes",
                                                   "name": "self-merge"})
        assert again.status_code == 409 and "exists" in again.json()["detail"]
        unknown = client.post("/api/v1/merge", json={"primary": "nope", "secondary": "tiny-shapes", "name": "x"})
        assert unknown.status_code == 400 and "unknown" in unknown.json()["detail"]
        three = client.post("/api/v1/merge", json={"primary": "tiny-shapes", "secondary": "tiny-shapes",
                                                   "name": "y"})
        assert three.status_code == 200
        bad = client.post("/api/v1/merge", json={"primary": "tiny-shapes", "secondary": "tiny-shapes",
                                                 "mode": "add-difference", "name": "z"})
        assert bad.status_code == 400 and "three models" in bad.json()["detail"]
        traversal = client.post("/api/v1/merge", json={"primary": "tiny-shapes", "secondary": "tiny-shapes",
                                                       "name": "../evil"})
        assert traversal.status_code == 422
        from imagine.adapters.lora import create
        from imagine.io.lora_keys import save_lora
        from imagine.io.networks import load_unet

        lora = create({"unet": load_unet(tiny_t2i_dir / "unet")}, rank=2, algo="loha")
        with torch.no_grad():
            for p in lora.parameters():
                p.add_(0.05)
        (tmp_path / "models" / "Lora").mkdir(exist_ok=True)
        save_lora(lora, tmp_path / "models" / "Lora" / "style.safetensors")
        with_lora = client.post("/api/v1/merge", json={"primary": "tiny-shapes", "secondary": "style",
                                                       "mode": "add-difference", "multiplier": 0.7,
                                                       "name": "with-style"})
        assert with_lora.status_code == 200, with_lora.text  # B an adapter from Lora/: A + M dW
        neither = client.post("/api/v1/merge", json={"primary": "tiny-shapes", "secondary": "nothing", "name": "n"})
        assert neither.status_code == 400 and "nor a LoRA" in neither.json()["detail"]
    no_dir = create_app([tiny_t2i_dir], out_dir=None)
    with TestClient(no_dir) as client:
        r = client.post("/api/v1/merge", json={"primary": "tiny-shapes", "secondary": "tiny-shapes", "name": "m"})
        assert r.status_code == 409 and "--models-dir" in r.json()["detail"]


def test_lora_strict_false_warns_and_leaves_out_what_fits_nothing(workspace, tiny_t2i_dir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(workspace / "models" / "Lora" / "sks-style.safetensors")
    tensors["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(8, 4)
    save_file(tensors, workspace / "partly.safetensors")
    strict = _imagine("generate", "a red circle", "--model", tiny_t2i_dir, "--lora", "partly.safetensors",
                      "--steps", "2", cwd=workspace)
    assert strict.returncode != 0 and "1 match no module: unet.no_such_block_to_q" in strict.stderr
    run = _imagine("generate", "a red circle", "--model", tiny_t2i_dir, "--steps", "4", "--seed", "5", "--out", "out",
                   "--lora", "partly.safetensors", "--lora-strict", "false", cwd=workspace)
    assert run.returncode == 0 and "1 match no module: unet.no_such_block_to_q" in run.stderr  # printed, not fatal
    loose = workspace / run.stdout.strip().splitlines()[-1]
    full = _generate(workspace, tiny_t2i_dir, "--lora", "sks-style")
    assert np.array_equal(_pixels(loose), _pixels(full))  # the layers that fit are applied, the rest left out
    again = _imagine("generate", "--from", loose, "--out", "again", cwd=workspace)  # --from keeps strict off
    assert again.returncode == 0, again.stderr[-2000:]
    assert np.array_equal(_pixels(workspace / again.stdout.strip().splitlines()[-1]), _pixels(loose))
