"""Real Stable Diffusion checkpoints, proven on tiny random SD 1.x, SD 2.x (v) and SDXL pipelines that
diffusers and transformers build offline, with CLIP's real tokenizer:

- our pipeline gives diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline image from the same
  initial latents, prompt, negative prompt, guidance and scheduler, within 1e-4 in [-1, 1];
- a single file imagine writes is what diffusers' own single-file converters read back as the same
  tensors, loads in imagine with the same output, and converts back to the same files bit for bit;
- SDXL's two text encoders follow clip skip and long prompts as diffusers and A1111 do.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file

from imagine.io.stable_diffusion import load_single_file, save_diffusers_pipeline, save_single_file
from imagine.pipelines import generate as g
from imagine.pipelines.request import load_text_model
from tests.tiny_sd import write_pipeline

TOL = 1e-4
ARCHS = ["sd1", "sd2", "sdxl"]
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "pipe"
    pipe = write_pipeline(request.param, folder)
    model, encoder = load_text_model(folder)
    return request.param, folder, pipe, model, encoder


def _noise(seed: int, n: int) -> torch.Tensor:
    """imagine's starting noise for images seed .. seed + n - 1 (before scaling to the top sigma)."""
    return torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("negative", ["blurry, low quality", ""])
def test_pipeline_matches_diffusers(tiny, sampler, negative):
    arch, _, pipe, model, encoder = tiny
    assert model.arch == arch
    s = g.Settings(prompt=PROMPT, negative_prompt=negative, steps=5, sampler=sampler, cfg_scale=5.0, seed=3, n=2,
                   width=16, height=16)
    ours = g.txt2img(model, s, encoder)
    cls = EulerDiscreteScheduler if sampler == "euler" else DPMSolverMultistepScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.scheduler.set_timesteps(5)
    # the same x_T. imagine starts at noise * sqrt(1 + sigma_max^2) in k-diffusion's (VE) coordinates,
    # which is the VP sample `noise` that DPM-Solver starts from; Euler works in VE coordinates and
    # multiplies the latents it is given by its init_noise_sigma (sigma_max under trailing spacing)
    latents = _noise(3, 2)
    if sampler == "euler":
        sigma_max = float(pipe.scheduler.sigmas[0])
        latents = latents * (1 + sigma_max**2) ** 0.5 / float(pipe.scheduler.init_noise_sigma)
    # diffusers zeroes SDXL's negative only when none is given (A1111 and imagine: when it is empty)
    neg = None if (arch == "sdxl" and negative == "") else negative
    ref = pipe(PROMPT, negative_prompt=neg, num_inference_steps=5, guidance_scale=5.0, latents=latents, height=16,
               width=16, output_type="np", num_images_per_prompt=2).images
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2) * 2 - 1
    assert (ours - ref).abs().max().item() <= TOL


def test_scheduler_config_sets_the_training_schedule_and_prediction(tiny):
    arch, _, _, model, _ = tiny
    spec = model.spec
    assert (spec.schedule, spec.beta_start, spec.beta_end, spec.num_train_timesteps) == ("scaled_linear", 0.00085,
                                                                                         0.012, 1000)
    assert spec.prediction == ("v" if arch == "sd2" else "eps")
    assert spec.zero_empty_negative == (arch == "sdxl")
    assert spec.image_size == 16  # sample_size 8 x the VAE's factor 2


def _diffusers_view(pipe, arch: str, ldm: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """What diffusers' single-file converters make of a single file's tensors."""
    out = {"unet": sfu.convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config)),
           "vae": sfu.convert_ldm_vae_checkpoint(ldm, dict(pipe.vae.config))}
    if arch == "sd1":
        out["text_encoder"] = sfu.convert_ldm_clip_checkpoint(ldm)
    elif arch == "sd2":
        out["text_encoder"] = sfu.convert_open_clip_checkpoint(pipe.text_encoder, ldm)
    else:
        out["text_encoder"] = sfu.convert_ldm_clip_checkpoint(ldm, "conditioner.embedders.0.transformer.")
        out["text_encoder_2"] = sfu.convert_open_clip_checkpoint(pipe.text_encoder_2, ldm,
                                                                 "conditioner.embedders.1.model.")
    return out


def test_single_file_is_what_diffusers_reads_and_loads_the_same(tiny, tmp_path):
    arch, _, pipe, model, encoder = tiny
    path = save_single_file(model, tmp_path / f"{arch}.safetensors")
    ldm = load_file(path)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in ldm)
    for part, converted in _diffusers_view(pipe, arch, ldm).items():
        original = {k.removeprefix("text_model."): v for k, v in getattr(pipe, part).state_dict().items()
                    if not k.endswith("position_ids")}
        converted = {k.removeprefix("text_model."): v for k, v in converted.items() if not k.endswith("position_ids")}
        assert set(converted) == set(original), part
        assert all(torch.equal(converted[k], original[k]) for k in original), part
    loaded = load_single_file(path)
    assert loaded.arch == arch and loaded.spec.prediction == model.spec.prediction
    s = g.Settings(prompt=PROMPT, negative_prompt="", steps=3, sampler="euler", seed=1, width=16, height=16)
    assert torch.equal(g.txt2img(model, s, encoder), g.txt2img(loaded, s, loaded.text_encoder))


def test_round_trips_are_bit_exact(tiny, tmp_path):
    arch, folder, _, model, _ = tiny
    single = save_single_file(model, tmp_path / "a.safetensors")
    back = save_diffusers_pipeline(load_single_file(single), tmp_path / "back")
    parts = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors"] + (["text_encoder_2/model.safetensors"] if arch == "sdxl" else [])
    for part in parts:
        a, b = load_file(folder / part), load_file(back / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    again = save_single_file(load_text_model(back)[0], tmp_path / "b.safetensors")
    a, b = load_file(single), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_single_file_is_computed_in_fp32(tiny, tmp_path):
    _, _, _, model, _ = tiny
    path = save_single_file(model, tmp_path / "half.safetensors", dtype="fp16")
    assert next(iter(load_file(path).values())).dtype == torch.float16
    loaded = load_single_file(path)
    assert next(loaded.unet.parameters()).dtype == torch.float32
    assert torch.equal(loaded.unet.conv_in.weight, model.unet.conv_in.weight.half().float())


def test_sdxl_clip_skip_long_prompts_and_emphasis(tmp_path):
    pipe = write_pipeline("sdxl", tmp_path / "xl")
    _, encoder = load_text_model(tmp_path / "xl")
    # clip skip N (A1111's count, 1 = last) is diffusers' clip_skip N - 2 on both encoders (its default: 2)
    for skip, theirs in ((2, None), (3, 1)):
        ref, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, clip_skip=theirs)
        out = encoder.encode([PROMPT], clip_skip=skip)
        assert (out.context - ref).abs().max().item() <= 1e-5
        assert (out.pooled - pooled).abs().max().item() <= 1e-5
    # more than 75 tokens: two 77-token windows on both encoders, the pooled embedding from the first
    long = ", ".join(["a red circle"] * 30)
    out = encoder.encode([long])
    assert out.context.shape == (1, 154, 64)
    first = ", ".join(["a red circle"] * 25)  # 25 x 3 tokens = 75 tokens = exactly the first window
    assert torch.allclose(out.pooled, encoder.encode([first]).pooled, atol=1e-6)
    # emphasis scales the weighted tokens of both encoders' states
    plain, weighted = encoder.encode(["a red circle"]), encoder.encode(["a (red:1.5) circle"])
    changed = (plain.context - weighted.context).abs().amax(dim=(0, 2)) > 0
    assert changed[2]  # token 2 is "red" (after the start token and "a")
    assert (plain.context[0, 2, :32] - weighted.context[0, 2, :32]).abs().max() > 0
    assert (plain.context[0, 2, 32:] - weighted.context[0, 2, 32:]).abs().max() > 0


def test_bf16_weights_halve_the_unet_and_run_bf16_only(tiny):
    from imagine.pipelines.request import Request

    _, folder, _, model, encoder = tiny
    half, half_encoder = load_text_model(folder, weights_dtype="bf16")
    assert next(half.unet.parameters()).dtype == torch.bfloat16
    s = g.Settings(prompt=PROMPT, steps=3, sampler="euler", seed=2, width=16, height=16, precision="bf16")
    close = (g.txt2img(half, s, half_encoder) - g.txt2img(model, s, encoder)).abs().max().item()
    assert 0 < close < 0.2  # the same picture; bf16 norms and biases round differently
    with pytest.raises(ValueError, match="loaded with bf16 weights"):
        Request("txt2img", g.Settings(prompt=PROMPT)).check(half)
