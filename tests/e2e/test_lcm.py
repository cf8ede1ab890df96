"""Latent consistency distillation end to end: distill-lcm (loss falls, exact resume), LCM-LoRA, the lcm
sampler through the CLI with the PNG record and --from."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from .test_control import imagine


@pytest.fixture(scope="module")
def lcm_dir(tiny_t2i_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lcm") / "tiny-lcm"
    run = imagine("distill-lcm", "--model", tiny_t2i_dir, "--out", out, "--steps", 4, "--batch-size", 2,
                  "--checkpoint-every", 2)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_distillation_loss_falls_on_a_tiny_model(tiny_t2i_dir, tmp_path):
    """Same draws every step (a one-image dataset, one grid index range): the consistency loss must fall as the
    student learns the teacher's one-step jumps."""
    from imagine.data.images import load_dataset
    from imagine.pipelines.request import load_text_model
    from imagine.train.lcm import LCMDistillConfig, distill_lcm

    model, encoder = load_text_model(tiny_t2i_dir)
    data = load_dataset("builtin:shapes", model.spec.image_size, 3, captions=True)
    cfg = LCMDistillConfig(steps=60, batch_size=4, lr=1e-3, log_every=1, checkpoint_every=0)
    distill_lcm(model, encoder, data, cfg, tmp_path / "lcm")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "lcm-training" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 60
    first, last = np.mean(losses[:15]), np.mean(losses[-15:])
    assert last < 0.8 * first, (first, last)


def test_distilled_folder_resumes_exactly_and_selects_lcm(lcm_dir, tiny_t2i_dir, tmp_path):
    spec = json.loads((lcm_dir / "diffusion.json").read_text())
    assert spec["consistency"] and spec["default_sampler"] == "lcm" and spec["default_steps"] == 4
    config = json.loads((lcm_dir / "unet" / "config.json").read_text())
    assert config["time_cond_proj_dim"] == 256
    common = ["--model", tiny_t2i_dir, "--batch-size", 2, "--checkpoint-every", 2, "--out", tmp_path / "lcm"]
    assert imagine("distill-lcm", "--steps", 2, *common).returncode == 0
    run = imagine("distill-lcm", "--steps", 4, "--resume", *common)
    assert run.returncode == 0, run.stderr[-2000:]
    straight = load_file(str(lcm_dir / "unet" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "lcm" / "unet" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(np.array_equal(straight[k].numpy(), resumed[k].numpy()) for k in straight)
    assert (lcm_dir.parent / "tiny-lcm-training" / "samples" / "step_0000004.png").exists()


def test_generate_with_an_lcm_records_and_reproduces(lcm_dir, tmp_path):
    common = ["--model", lcm_dir, "--width", 16, "--height", 16, "--seed", 3, "--n", 2]
    run = imagine("generate", "a red circle", *common, "--out", "a", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "a" / "000003-txt2img.png"
    text = Image.open(out).info["parameters"]
    assert "Steps: 4" in text and "Sampler: LCM" in text
    run = imagine("generate", "--from", out, "--out", "b", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "000003-txt2img.png")), np.asarray(Image.open(out)))
    # image i of a batch is seed + i alone
    run = imagine("generate", "a red circle", *common[:-2], "--seed", 4, "--out", "c", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c" / "000004-txt2img.png")),
                          np.asarray(Image.open(tmp_path / "a" / "000004-txt2img.png")))
    for steps in (1, 2):
        run = imagine("generate", "a red circle", *common, "--steps", steps, "--out", f"s{steps}", cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
    run = imagine("generate", "a red circle", *common, "--negative", "blue", "--out", "bad", cwd=tmp_path)
    assert run.returncode != 0 and "negative prompt cannot act" in run.stderr


def test_lcm_lora_distils_and_loads_as_a_lora(tiny_t2i_dir, tmp_path):
    out = tmp_path / "lcm-lora.safetensors"
    run = imagine("distill-lcm", "--model", tiny_t2i_dir, "--out", out, "--lora", 4, "--steps", 2, "--batch-size", 2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "--sampler lcm --steps 4 --cfg 1" in run.stdout
    run = imagine("generate", "a red circle", "--model", tiny_t2i_dir, "--lora", out, "--sampler", "lcm", "--steps", 4,
                  "--cfg", 1, "--width", 16, "--height", 16, "--out", "o", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    text = Image.open(next((tmp_path / "o").glob("*.png"))).info["parameters"]
    assert "<lora:lcm-lora:1>" in text or "lcm-lora" in text


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory):
    """A tiny flow-matching UNet and a tiny flow MMDiT, trained a few steps on the shapes language."""
    root = tmp_path_factory.mktemp("flow-teachers")
    for arch in ("unet", "mmdit"):
        run = imagine("train", "--data", "builtin:shapes-language", "--preset", "tiny-t2i", "--arch", arch,
                      "--prediction", "flow", "--steps", 3, "--out", root / arch)
        assert run.returncode == 0, run.stderr[-2000:]
    return root


def test_a_flow_teacher_distils_and_its_loss_falls(flow_models, tmp_path):
    """Flow consistency distillation: the straight path's grid and solver (diffusion/consistency.py); the same
    draws every step, so the loss must fall as the student learns the teacher's jumps."""
    from imagine.data.images import load_dataset
    from imagine.pipelines.request import load_text_model
    from imagine.train.lcm import LCMDistillConfig, distill_lcm

    model, encoder = load_text_model(flow_models / "unet")
    data = load_dataset("builtin:shapes", model.spec.image_size, 3, captions=True)
    cfg = LCMDistillConfig(steps=40, batch_size=4, lr=1e-3, log_every=1, checkpoint_every=0)
    distill_lcm(model, encoder, data, cfg, tmp_path / "lcm")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "lcm-training" / "log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses
    spec = json.loads((tmp_path / "lcm" / "diffusion.json").read_text())
    assert spec["prediction"] == "flow" and spec["consistency"] and spec["default_sampler"] == "lcm"
    run = imagine("generate", "a red circle", "--model", tmp_path / "lcm", "--seed", 2, "--out", "a", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    png = next((tmp_path / "a").glob("*.png"))
    assert "Sampler: LCM" in Image.open(png).info["parameters"]
    again = imagine("generate", "--from", png, "--out", "b", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(next((tmp_path / "b").glob("*.png")))))


def test_a_flow_transformer_distils_as_an_lcm_lora(flow_models, tmp_path):
    """An MMDiT has no guidance input to learn: it distils as an LCM-LoRA (on its attention and MLP
    projections), used with the lcm sampler at cfg 1; asking for a full LCM says so."""
    teacher = flow_models / "mmdit"
    refused = imagine("distill-lcm", "--model", teacher, "--out", tmp_path / "full", "--steps", 1)
    assert refused.returncode != 0 and "LCM-LoRA" in refused.stderr
    out = tmp_path / "lcm-lora.safetensors"
    run = imagine("distill-lcm", "--model", teacher, "--out", out, "--lora", 4, "--steps", 3, "--batch-size", 2)
    assert run.returncode == 0, run.stderr[-3000:]
    keys = load_file(str(out)).keys()
    assert any("transformer_blocks" in k for k in keys), sorted(keys)[:5]
    made = imagine("generate", "a red circle", "--model", teacher, "--lora", out, "--sampler", "lcm", "--steps", 2,
                   "--cfg", 1, "--out", "o", cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    png = next((tmp_path / "o").glob("*.png"))
    again = imagine("generate", "--from", png, "--out", "p", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(next((tmp_path / "p").glob("*.png")))))
