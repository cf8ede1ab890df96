"""Stable Diffusion 3 from a diffusers folder, proven on tiny random StableDiffusion3Pipelines that diffusers
and transformers build offline (CLIP's real tokenizer, a T5 tokenizer built with the tokenizers library):
our pipeline gives diffusers' image from the same initial latents, prompt, negative prompt, guidance and
steps within 1e-4 in [-1, 1], with T5 and without it; the prompt conventions (three encoders, padded and
joined; the pooled CLIP vectors) are diffusers' to the number."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from imagine.pipelines import generate as g
from imagine.pipelines.request import load_text_model
from tests.tiny_sd import write_sd3

TOL = 1e-4
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "no-t5"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3") / "pipe"
    pipe = write_sd3(folder, t5=request.param)
    model, encoder = load_text_model(folder)
    return folder, pipe, model, encoder


def _noise(seed: int, n: int) -> torch.Tensor:
    return torch.stack([torch.randn((16, 8, 8), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


def test_the_folder_is_read_as_sd3(tiny):
    _, _, model, _ = tiny
    spec = model.spec
    assert model.arch == "sd3" and model.family.network == "mmdit"
    assert (spec.prediction, spec.flow_shift, spec.image_size, spec.default_sampler) == ("flow", 3.0, 16, "euler")


def test_prompt_encoding_matches_diffusers(tiny):
    _, pipe, _, encoder = tiny
    want, _, pooled, _ = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
    got = encoder.encode([PROMPT])
    assert got.context.shape == want.shape and got.mask.all()
    assert (got.context - want).abs().max() < 1e-5 and (got.pooled - pooled).abs().max() < 1e-5


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("negative", ["blurry, low quality", ""])
def test_pipeline_matches_diffusers(tiny, sampler, negative):
    _, pipe, model, encoder = tiny
    s = g.Settings(prompt=PROMPT, negative_prompt=negative, steps=4, sampler=sampler, cfg_scale=5.0, seed=3, n=2,
                   width=16, height=16)
    ours = g.txt2img(model, s, encoder)
    cls = FlowMatchHeunDiscreteScheduler if sampler == "heun" else FlowMatchEulerDiscreteScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    ref = pipe(PROMPT, negative_prompt=negative, num_inference_steps=4, guidance_scale=5.0, latents=_noise(3, 2),
               height=16, width=16, output_type="np", num_images_per_prompt=2).images
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2) * 2 - 1
    assert (ours - ref).abs().max().item() <= TOL


def test_long_prompts_and_emphasis(tiny):
    """Past 75 tokens CLIP takes another window (A1111's chunking); T5 keeps its 256; emphasis moves the
    image, and the same prompt in a batch with a longer one is the same image."""
    _, _, model, encoder = tiny
    long = ", ".join(["a red circle above a blue square"] * 12)
    assert encoder.encode([long]).context.shape[1] == 2 * 77 + 256
    base = g.Settings(prompt=PROMPT, steps=3, cfg_scale=3.0, seed=1, width=16, height=16)
    plain = g.txt2img(model, base, encoder)
    loud = g.txt2img(model, g.Settings(**{**base.__dict__, "prompt": "a (red:1.6) circle above a blue square"}),
                     encoder)
    assert (plain - loud).abs().max() > 1e-5  # a tiny random model moves little, but it moves
    both = encoder.encode([PROMPT, long])
    alone = encoder.encode([PROMPT])
    n = alone.context.shape[1] - 256
    assert torch.allclose(both.context[0, :n], alone.context[0, :n]) and torch.allclose(both.context[0, -256:],
                                                                                        alone.context[0, -256:])


def test_every_door_serves_sd3(tiny, tmp_path):
    """The CLI (its PNG regenerating bit for bit), the job API and A1111's API take the SD3 folder with no
    branch of their own; the served pixels equal the pipeline's; it converts to a single file and a folder."""
    import base64
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from imagine.pipelines.unconditional import to_uint8
    from imagine.server.app import create_app
    from tests.e2e.inprocess import imagine

    folder, _, model, encoder = tiny
    run = imagine("generate", PROMPT, "--model", folder, "--steps", 3, "--seed", 4, "--out", "a", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    png = next((tmp_path / "a").glob("*.png"))
    again = imagine("generate", "--from", png, "--out", "b", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(next((tmp_path / "b").glob("*.png")))))
    converted = imagine("convert", folder, tmp_path / "x.safetensors")  # to Stability's single file
    assert converted.returncode == 0, converted.stderr[-2000:]
    as_folder = imagine("convert", folder, tmp_path / "x-folder", "--to", "diffusers")
    assert as_folder.returncode == 0 and (tmp_path / "x-folder" / "transformer").is_dir(), as_folder.stderr[-2000:]
    want = to_uint8(g.txt2img(model, g.Settings(prompt=PROMPT, steps=3, seed=5, sampler="euler", cfg_scale=4,
                                                width=16, height=16), encoder))[0]
    with TestClient(create_app([folder], out_dir=None)) as client:
        made = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 3, "seed": 5, "sampler_name": "Euler",
                                                       "cfg_scale": 4, "width": 16, "height": 16})
        assert made.status_code == 200, made.text
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(made.json()["images"][0]))))
        assert np.array_equal(served, want)
        models = client.get("/sdapi/v1/sd-models").json()
        assert any(m["model_name"] == "pipe" for m in models)


def test_an_sd3_controlnet_matches_diffusers(tiny, tmp_path, monkeypatch):
    """A diffusers SD3ControlNetModel folder (InstantX's and Stability's layout) drives the MMDiT as diffusers'
    StableDiffusion3ControlNetPipeline does: the condition's latents (the VAE's mean; diffusers draws a
    sample, so the oracle is made to take the mean too), zeros for the ControlNet's pooled input."""
    import numpy as np
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders import vae as diffusers_vae
    from PIL import Image

    from imagine.adapters.control import Conditioner, condition_tensor
    from imagine.io.control_files import load_control

    _, pipe, model, encoder = tiny
    torch.manual_seed(0)
    net = SD3ControlNetModel(sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                             num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                             pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    net.save_pretrained(tmp_path / "sd3_canny")
    control = Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8))
    unit = Conditioner(load_control(tmp_path / "sd3_canny"), condition_tensor(control), weight=0.8)
    s = g.Settings(prompt=PROMPT, negative_prompt="blurry", steps=3, sampler="euler", cfg_scale=4.0, seed=3,
                   width=16, height=16)
    ours = g.txt2img(model, s, encoder, attachments=[unit])
    monkeypatch.setattr(diffusers_vae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    theirs = StableDiffusion3ControlNetPipeline(**{k: v for k, v in pipe.components.items()
                                                    if k not in ("image_encoder", "feature_extractor")},
                                                controlnet=SD3ControlNetModel.from_pretrained(tmp_path / "sd3_canny"))
    theirs.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ref = theirs(PROMPT, negative_prompt="blurry", control_image=control, controlnet_conditioning_scale=0.8,
                 num_inference_steps=3, guidance_scale=4.0, latents=_noise(3, 1), height=16, width=16,
                 output_type="np").images
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2) * 2 - 1
    assert (ours - g.txt2img(model, s, encoder)).abs().max() > 10 * TOL
    assert (ours - ref).abs().max().item() <= TOL


def test_single_files_read_write_and_match_diffusers_converter(tiny, tmp_path):
    """An SD3 all-in-one single file (Stability's layout: model.diffusion_model.joint_blocks.*, the 16-channel
    VAE under first_stage_model., text_encoders.clip_l/clip_g/t5xxl.transformer.*): the transformer part is
    what diffusers' own single-file converter reads back to the same tensors; the file loads to the folder's
    very pixels; writing it again gives the same tensors bit for bit. T5 needs its tokenizer beside the file."""
    import shutil

    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file

    from imagine.io.stable_diffusion import load_single_file, save_single_file

    folder, _, model, encoder = tiny
    out = save_single_file(model, tmp_path / "sd3.safetensors")
    written = load_file(str(out))
    prefix = "model.diffusion_model."
    theirs = sfu.convert_sd3_transformer_checkpoint_to_diffusers(
        {k[len(prefix):]: v for k, v in written.items() if k.startswith(prefix)})
    ours = model.unet.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    has_t5 = encoder.t5 is not None
    if has_t5:
        with pytest.raises(Exception, match="no tokenizer for it"):
            load_single_file(out)
        shutil.copytree(folder / "tokenizer_3", tmp_path / "tokenizer_3")
    loaded = load_single_file(out)
    s = g.Settings(prompt=PROMPT, negative_prompt="blurry", steps=3, sampler="euler", cfg_scale=4.0, seed=2,
                   width=16, height=16)
    assert torch.equal(g.txt2img(loaded, s, loaded.text_encoder), g.txt2img(model, s, encoder))
    again = load_file(str(save_single_file(loaded, tmp_path / "again.safetensors")))
    assert again.keys() == written.keys() and all(torch.equal(again[k], written[k]) for k in written)


def test_separate_text_encoders_as_comfyui_and_forge_keep_them(tmp_path):
    """Stability's SD 3.5 files hold the MMDiT and the VAE only; CLIP-L, CLIP-G and T5 come as separate files
    (models/text_encoders/clip_l, clip_g, t5xxl). Missing ones are named; found beside the file or named with
    --text-encoder (Forge's forge_additional_modules at the A1111 API) they give the all-in-one file's pixels; the
    PNG names them as Forge does ("Module 1: clip_l") and --from reloads the same files."""
    import base64
    import io
    import json
    import shutil

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from imagine.io import sd3_files
    from imagine.io.png import read_png_metadata
    from imagine.io.stable_diffusion import load_single_file, save_single_file
    from imagine.pipelines.unconditional import to_uint8
    from imagine.server.app import create_app
    from tests.e2e.inprocess import imagine

    folder = tmp_path / "pipe"
    write_sd3(folder, seed=1, inferable=True)
    model, encoder = load_text_model(folder)
    everything = load_file(str(save_single_file(model, tmp_path / "aio.safetensors")))
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "text_encoders").mkdir()
    bare = models / "Stable-diffusion" / "sd35-bare.safetensors"
    with safe_open(str(tmp_path / "aio.safetensors"), "pt") as handle:  # the tiny MMDiT's heads: from our metadata
        ours = json.loads(handle.metadata()["imagine"])
    save_file({k: v for k, v in everything.items() if not k.startswith("text_encoders.")}, str(bare),
              {"imagine": json.dumps({k: ours[k] for k in ("transformer", "vae")})})
    with pytest.raises(Exception, match=r"has no CLIP-L .*CLIP-G"):
        load_single_file(bare)
    parts = {"clip_l": sd3_files.CLIP_L, "clip_g": sd3_files.CLIP_G}
    if encoder.t5 is not None:
        parts["t5xxl_fp16"] = sd3_files.T5
        shutil.copytree(folder / "tokenizer_3", models / "text_encoders" / "tokenizer_3")
    for name, prefix in parts.items():
        save_file({k[len(prefix):]: v for k, v in everything.items() if k.startswith(prefix)},
                  str(models / "text_encoders" / f"{name}.safetensors"))
    s = g.Settings(prompt=PROMPT, negative_prompt="blurry", steps=2, sampler="euler", cfg_scale=4.0, seed=3,
                   width=16, height=16)
    want = g.txt2img(model, s, encoder)
    found = load_single_file(bare)  # by place: the models folder's text_encoders/
    assert sorted(p.stem for p in found.module_paths) == sorted(parts)
    assert torch.equal(g.txt2img(found, s, found.text_encoder), want)
    with pytest.raises(Exception, match="no text encoder or VAE imagine knows"):
        load_single_file(bare, modules=[bare])
    # a CLIP-G kept in OpenCLIP's layout (packed in_proj, resblocks) reads the same
    from imagine.io.ldm_keys import open_clip_map, write_mapped

    clip_g = load_file(str(models / "text_encoders" / "clip_g.safetensors"))
    keys = [k for k in clip_g if not k.endswith("position_ids")]
    (tmp_path / "elsewhere").mkdir()
    save_file(write_mapped({k: clip_g[k] for k in keys}, open_clip_map(keys, "")),
              str(tmp_path / "elsewhere" / "clip_g_openclip.safetensors"))
    named = load_single_file(bare, modules=[tmp_path / "elsewhere" / "clip_g_openclip.safetensors"])
    assert torch.equal(g.txt2img(named, s, named.text_encoder), want)

    named = ["--text-encoder", "clip_l", "--text-encoder", "clip_g"]
    run = imagine("generate", PROMPT, "--model", "sd35-bare", "--models-dir", models, *named, "--steps", 2,
                  "--width", 16, "--height", 16, "--out", "a", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    png = next((tmp_path / "a").glob("*.png"))
    parameters, record = read_png_metadata(png)
    assert "Module 1: clip_l" in parameters and "Module 2: clip_g" in parameters
    assert [Path(m).stem for m in record["model"]["modules"]][:2] == ["clip_l", "clip_g"]
    again = imagine("generate", "--from", png, "--out", "b", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(next((tmp_path / "b").glob("*.png")))))
    wrong = imagine("generate", PROMPT, "--model", folder, "--text-encoder", models / "text_encoders" /
                    "clip_l.safetensors", "--steps", 1, "--out", "c", cwd=tmp_path)
    assert wrong.returncode != 0 and "model folder" in wrong.stderr

    with TestClient(create_app([bare], out_dir=None, models_dir=models)) as client:
        listed = client.get("/sdapi/v1/sd-modules").json()
        assert sorted(m["model_name"] for m in listed) == sorted(parts)
        files = [m["filename"] for m in listed]
        body = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 2, "seed": 3, "sampler_name": "Euler",
                "cfg_scale": 4, "width": 16, "height": 16, "override_settings": {"forge_additional_modules": files}}
        made = client.post("/sdapi/v1/txt2img", json=body)
        assert made.status_code == 200, made.text
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(made.json()["images"][0]))))
        assert np.array_equal(served, to_uint8(want)[0])
        unknown = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {
            "forge_additional_modules": ["nothing.safetensors"]}})
        assert unknown.status_code in (400, 404, 422) and "text encoder 'nothing.safetensors' unknown" in unknown.text
        assert client.get("/api/v1/models").json()["models"][0]["takes"]["text_encoders"]


def test_img2img_matches_diffusers_and_inpaint_keeps_the_rest(tiny, tmp_path):
    """img2img from the same starting latents and noise equals StableDiffusion3Img2ImgPipeline within 1e-4 (the
    strength picks the same last steps of the shifted flow schedule); inpaint by mask regenerates the masked
    square and keeps every other pixel exactly."""
    import numpy as np
    from diffusers import StableDiffusion3Img2ImgPipeline
    from PIL import Image

    folder, _, model, encoder = tiny
    extra = {} if encoder.t5 is not None else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(folder, image_encoder=None, feature_extractor=None, **extra)
    init = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8"))
    s = g.Settings(prompt=PROMPT, negative_prompt="blurry", steps=5, sampler="euler", cfg_scale=4.0, seed=3,
                   width=16, height=16, strength=0.6)
    ours = g.img2img(model, s, init, encoder)
    latents = g._encode(model, g._image_tensor(init, (16, 16), 3))  # given as latents: no VAE sampling there
    want = pipe(PROMPT, negative_prompt="blurry", image=latents, strength=0.6, num_inference_steps=5,
                guidance_scale=4.0, generator=torch.Generator().manual_seed(3), output_type="pt").images * 2 - 1
    assert (ours - want).abs().max().item() < TOL
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    painted = g.inpaint(model, replace(s, strength=1.0, mask_blur=0), init, mask, encoder)
    original = g._image_tensor(init, (16, 16), 3)
    keep = torch.ones(16, 16, dtype=torch.bool)
    keep[4:12, 4:12] = False
    assert torch.equal(painted[0][:, keep], original[0][:, keep])
    assert (painted[0][:, ~keep] - original[0][:, ~keep]).abs().mean() > 0.05
