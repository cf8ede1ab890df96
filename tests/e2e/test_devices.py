"""Placement (issue 35) proven on the meta device: the tiny model's networks moved there compute shapes only, and
any tensor the pipeline made on the CPU and mixed with theirs (noise, conditioning, masks, init latents) fails
the run, as it would on a GPU."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def meta_model(tiny_t2i_dir):
    from imagine.io.model_folder import load_model_folder

    model = load_model_folder(tiny_t2i_dir)
    model.unet.to("meta")
    model.vae.to("meta")
    return model


def test_every_request_kind_keeps_to_the_networks_device(meta_model, monkeypatch):
    """txt2img with guidance, img2img, inpaint (latent noise fill) and an edit by inversion, the text encoder
    left on the CPU: every tensor the pipeline makes reaches the meta device or the run fails."""
    from imagine.models.text_encoders import default_text_encoder
    from imagine.pipelines import generate as g
    from imagine.pipelines.inversion import edit

    seen = []

    def decode(model, latent, runtime=None, vae_tile=None):  # meta computes no pixels: where is the latent? stand in
        seen.append(latent.device.type)
        return torch.zeros(latent.shape[0], 3, latent.shape[2] * 2, latent.shape[3] * 2)

    monkeypatch.setattr(g, "decode", decode)
    import imagine.pipelines.inversion as inversion

    monkeypatch.setattr(inversion, "decode", decode)
    encoder = default_text_encoder()
    s = g.Settings(prompt="a red circle", negative_prompt="blue", steps=2, cfg_scale=3.0, seed=1, n=2, width=16,
                   height=16, sampler="euler")
    init = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))
    g.txt2img(meta_model, s, encoder)
    g.img2img(meta_model, replace(s, strength=0.6), init, encoder)
    g.inpaint(meta_model, replace(s, inpaint_fill="latent_noise", mask_blur=0), init, mask, encoder)
    edit(meta_model, replace(s, n=1, source_prompt="a blue circle", edit_mask=False, strength=1.0, sampler="ddim"),
         init, encoder)
    assert seen == ["meta"] * 4


def test_a_lora_made_on_the_cpu_follows_the_network(meta_model, tiny_t2i_dir, monkeypatch):
    """A LoRA made on the CPU (as one read from a file is) attaches to a network on another device; the
    layers move beside the weights they update."""
    from imagine.adapters.lora import attach, create
    from imagine.io.model_folder import load_model_folder
    from imagine.models.text_encoders import default_text_encoder
    from imagine.pipelines import generate as g

    cpu = load_model_folder(tiny_t2i_dir)
    lora = create({"unet": cpu.unet}, rank=2)
    assert all(p.device.type == "cpu" for layer in lora.layers.values() for p in layer.parameters())
    attached = attach({"unet": meta_model.unet}, [(lora, 0.8)])
    seen = []
    monkeypatch.setattr(g, "decode", lambda model, latent, runtime=None, vae_tile=None: seen.append(
                        latent.device.type) or
                        torch.zeros(latent.shape[0], 3, 16, 16))
    s = g.Settings(prompt="a red circle", steps=2, cfg_scale=3.0, seed=1, width=16, height=16, sampler="euler")
    try:
        g.txt2img(meta_model, s, default_text_encoder())
    finally:
        attached.detach()
    assert seen == ["meta"]
    assert all(p.device.type == "meta" for layer in lora.layers.values() for p in layer.parameters())


def test_a_super_resolution_stage_runs_beside_its_network(monkeypatch):
    """The SR stage's low-resolution rows (made on the CPU) follow its network to the device."""
    from imagine.io.model_folder import load_model_folder, sr_stage_folders
    from imagine.models.text_encoders import default_text_encoder
    from imagine.pipelines import generate as g
    from imagine.pipelines.upscale import sr_stage, stage_settings
    from imagine.weights import SR_MODEL

    stage = load_model_folder(sr_stage_folders(SR_MODEL)[0])  # its own copy: the cached stages stay on the CPU
    stage.unet.to("meta")
    seen = []
    monkeypatch.setattr(g, "decode", lambda model, latent, runtime=None, vae_tile=None: seen.append(
                        latent.device.type) or
                        torch.zeros(latent.shape[0], 3, *latent.shape[-2:]))
    s = replace(stage_settings(stage, g.Settings(prompt="a red circle", seed=3)), steps=2)
    out = sr_stage(stage, torch.zeros(1, 3, 16, 16), s, default_text_encoder())
    assert seen == ["meta"] and out.shape[-1] == 16 * stage.spec.upscale
