"""PixArt-alpha and -Sigma from diffusers folders, proven on tiny random pipelines built offline: T5's masked
states (120 and 300 tokens), eps with a learned variance on the linear VP schedule; the same image as
diffusers' pipelines from the same initial latents, prompt, negative prompt and guidance within 1e-4, with its
resolution binning (caption cleaning off: imagine reads the prompt as written)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from imagine.pipelines import generate as g
from imagine.pipelines.request import load_text_model
from tests.tiny_sd import write_pixart

TOL = 1e-4
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module", params=[False, True], ids=["alpha", "sigma"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixart") / "pipe"
    pipe = write_pixart(folder, sigma=request.param)
    model, encoder = load_text_model(folder)
    return request.param, folder, pipe, model, encoder


def test_the_folder_is_read_as_pixart(tiny):
    sigma, _, _, model, encoder = tiny
    assert model.arch == ("pixart-sigma" if sigma else "pixart-alpha") and model.family.network == "pixart"
    assert model.spec.learned_variance and model.spec.prediction == "eps" and model.spec.schedule == "linear"
    text = encoder.encode([PROMPT])
    assert text.context.shape[1] == (300 if sigma else 120) and 0 < int(text.mask.sum()) < text.mask.shape[1]


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler"])
def test_pipeline_matches_diffusers(tiny, sampler):
    _, _, pipe, model, encoder = tiny
    s = g.Settings(prompt=PROMPT, negative_prompt="blurry", steps=5, sampler=sampler, cfg_scale=4.5, seed=3, n=2,
                   width=16, height=16)
    ours = g.txt2img(model, s, encoder)
    cls = DPMSolverMultistepScheduler if sampler == "dpmpp_2m" else EulerDiscreteScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.scheduler.set_timesteps(5)
    latents = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(3 + i)) for i in range(2)])
    if sampler == "euler":  # Euler takes VE latents scaled by its init sigma; imagine's prior is the VP sample
        sigma_max = float(pipe.scheduler.sigmas[0])
        latents = latents * (1 + sigma_max**2) ** 0.5 / float(pipe.scheduler.init_noise_sigma)
    ref = pipe(PROMPT, negative_prompt="blurry", num_inference_steps=5, guidance_scale=4.5, latents=latents,
               height=16, width=16, output_type="np", num_images_per_prompt=2, use_resolution_binning=False,
               clean_caption=False).images
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2) * 2 - 1
    assert (ours - ref).abs().max().item() <= TOL


def test_pixart_takes_no_clip_skip_and_no_embedding(tiny, tmp_path):
    from tests.e2e.inprocess import imagine

    _, folder, _, _, _ = tiny
    run = imagine("generate", PROMPT, "--model", folder, "--steps", 2, "--clip-skip", 2, "--out", "a", cwd=tmp_path)
    assert run.returncode != 0 and "no meaning for T5" in run.stderr
    run = imagine("generate", PROMPT, "--model", folder, "--steps", 2, "--out", "b", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]


def test_resolution_binning_matches_diffusers(tmp_path):
    """A PixArt transformer of sample size 32 has buckets (its pipelines' 256 px table): a 64 x 48 request is
    generated at the 0.72 bucket (288 x 208; 0.78 is as close, and the first wins), then resized to cover
    64 x 48 and centre-cropped before the clamp, as diffusers' use_resolution_binning does, within 1e-4; off, it
    is generated at the size asked; the PNG says which."""
    pipe = write_pixart(tmp_path / "pipe", sample_size=32)
    model, encoder = load_text_model(tmp_path / "pipe")
    s = g.Settings(prompt=PROMPT, negative_prompt="blurry", steps=2, sampler="euler", cfg_scale=4.5, seed=3,
                   width=64, height=48)
    assert g.sampling_size(model, s, 64, 48) == (288, 208)
    ours = g.txt2img(model, s, encoder)
    assert ours.shape[-2:] == (48, 64)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    latents = torch.randn((4, 104, 144), generator=torch.Generator().manual_seed(3))[None]
    want = pipe(PROMPT, negative_prompt="blurry", num_inference_steps=2, guidance_scale=4.5, height=48, width=64,
                latents=latents, output_type="pt", use_resolution_binning=True).images * 2 - 1
    assert want.shape == ours.shape and (ours - want).abs().max().item() < TOL
    parameters, _ = g.describe(model, s, "txt2img", 0, encoder)
    assert "Resolution binning: 288x208" in parameters
    off = replace(s, resolution_binning=False)
    assert g.sampling_size(model, off, 64, 48) is None and g.txt2img(model, off, encoder).shape[-2:] == (48, 64)
    assert "Resolution binning: off" in g.describe(model, off, "txt2img", 0, encoder)[0]
