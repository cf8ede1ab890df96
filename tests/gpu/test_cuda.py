"""On a CUDA GPU (issue 35): generation with --device cuda gives the CPU's image up to the GPU's arithmetic, the
PNG records the device, and attachments and the inversion follow the network there."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu


def test_cuda_generation_matches_the_cpu(tiny_t2i_dir):
    from imagine.pipelines import generate as g
    from imagine.pipelines.request import Request, load_text_model, run

    s = g.Settings(prompt="a red circle", steps=4, cfg_scale=3.0, seed=2, n=2, width=16, height=16)
    cpu = run(Request("txt2img", s), *load_text_model(tiny_t2i_dir, device="cpu"))
    gpu = run(Request("txt2img", s), *load_text_model(tiny_t2i_dir, device="cuda"))
    for a, b in zip(cpu, gpu, strict=True):
        assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 3  # a level or so of arithmetic
        assert b.record["device"].startswith("cuda")


def test_edits_and_inpainting_run_on_cuda(tiny_t2i_dir):
    from imagine.pipelines import generate as g
    from imagine.pipelines.inversion import edit
    from imagine.pipelines.request import load_text_model

    model, encoder = load_text_model(tiny_t2i_dir, device="cuda")
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))
    s = g.Settings(prompt="a red circle", steps=3, cfg_scale=3.0, seed=1, width=16, height=16)
    assert g.inpaint(model, replace(s, inpaint_fill="latent_noise"), init, mask, encoder).device.type == "cpu"
    assert g.img2img(model, s, init, encoder).shape == (1, 3, 16, 16)
    out = edit(model, replace(s, source_prompt="a blue circle", null_text=True, strength=1.0), init, encoder)
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_offload_and_compact_weights_on_cuda(tiny_t2i_dir):
    """Model and sequential offload give the resident run's pixels and hold less on the GPU; fp8 weights run."""
    from imagine.pipelines.request import Request, load_text_model, run
    from imagine.pipelines.settings import Settings

    s = Settings(prompt="a red circle", steps=3, cfg_scale=3.0, seed=1, width=16, height=16, precision="bf16")
    want = run(Request("txt2img", s), *load_text_model(tiny_t2i_dir, device="cuda", offload="none"))[0].pixels
    for mode in ("model", "sequential"):
        model, encoder = load_text_model(tiny_t2i_dir, device="cuda", offload=mode)
        assert next(model.unet.parameters()).device.type == "cpu"  # home between runs
        got = run(Request("txt2img", s).check(model), model, encoder)[0]
        assert np.array_equal(got.pixels, want) and got.record["device"].startswith("cuda")
    model, encoder = load_text_model(tiny_t2i_dir, device="cuda", weights_dtype="fp8")
    assert run(Request("txt2img", s).check(model), model, encoder)[0].pixels.shape == want.shape
