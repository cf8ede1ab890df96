"""DDIM inversion (issue 37) held to diffusers on tiny random models built offline: every inverted latent of an
SD 1.x UNet equals DDIMInverseScheduler's walk from the same latent within 1e-4, and sampling back from it under
guidance equals DDIMScheduler's (trailing spacing, as imagine walks); an SD3 MMDiT inverts along the flow's
straight path as an Euler walk backwards over FlowMatchEulerDiscreteScheduler's times (the network reading the
current latent at the next time, as DDIM inversion does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from imagine.pipelines import generate as g
from imagine.pipelines.inversion import edit, invert
from imagine.pipelines.request import load_text_model
from tests.tiny_sd import write_pipeline, write_sd3

TOL = 1e-4
PROMPT = "a red circle above a blue square"
STEPS = 5  # 1000 / 5: DDIMInverseScheduler steps back by the integer ratio


def _image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(2).random((16, 16, 3)) * 255).astype("uint8"))


def test_ddim_inversion_and_its_reconstruction_match_diffusers(tmp_path):
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    pipe = write_pipeline("sd1", tmp_path / "sd1")
    model, encoder = load_text_model(tmp_path / "sd1")
    s = g.Settings(prompt=PROMPT, source_prompt=PROMPT, negative_prompt="blurry", steps=STEPS, cfg_scale=5.0,
                   width=16, height=16, strength=1.0, edit_mask=False)
    inversion = invert(model, s, _image(), encoder)
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing",
                  set_alpha_to_one=True, clip_sample=False)
    inverse = DDIMInverseScheduler(**config)
    inverse.set_timesteps(STEPS)
    cond, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    z = inversion.latents[0]
    assert torch.equal(z, g._init_latent(model, s, _image(), (16, 16)))
    with torch.no_grad():
        for k, t in enumerate(inverse.timesteps):
            eps = pipe.unet(z, t, encoder_hidden_states=cond).sample
            z = inverse.step(eps, t, z).prev_sample
            ours = inversion.latents[k + 1] / (1 + inversion.levels[k + 1] ** 2).sqrt()  # the VE view's VP latent
            assert (ours - z).abs().max().item() < TOL, f"inverted latent {k + 1}"
        # back down under guidance, from diffusers' own inverted latent
        forward = DDIMScheduler(**config)
        forward.set_timesteps(STEPS)
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="blurry")
        for t in forward.timesteps:
            e_u, e_c = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            z = forward.step(e_u + 5.0 * (e_c - e_u), t, z).prev_sample
        want = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    got = edit(model, s, _image(), encoder, inversion=inversion)
    assert (got - want).abs().max().item() < TOL


def test_a_flow_model_inverts_along_its_straight_path(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = write_sd3(tmp_path / "sd3", t5=False)
    model, encoder = load_text_model(tmp_path / "sd3")
    s = g.Settings(prompt=PROMPT, source_prompt=PROMPT, steps=4, cfg_scale=1.0, width=16, height=16, strength=1.0,
                   edit_mask=False)
    inversion = invert(model, s, _image(), encoder)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    times = scheduler.sigmas.flip(0)  # ascending: 0, then the walk's times
    cond, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
    z = inversion.latents[0]
    with torch.no_grad():
        for k in range(4):
            a, b = times[k], times[k + 1]
            v = pipe.transformer(z, encoder_hidden_states=cond, pooled_projections=pooled,
                                 timestep=(b * 1000).expand(1)).sample
            z = z + (b - a) * v
            assert (inversion.latents[k + 1] - z).abs().max().item() < TOL, f"inverted latent {k + 1}"
    # and walking back down with the same prompt and no guidance lands near the image's latent
    back = edit(model, s, _image(), encoder, inversion=inversion)
    assert back.shape == (1, 3, 16, 16)
