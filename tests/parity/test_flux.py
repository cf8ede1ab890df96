"""Flux.1 [dev] and [schnell] from diffusers folders, proven on tiny random FluxPipelines built offline: the
same image as diffusers' from the same initial latents, prompt, steps and (for [dev]) distilled guidance
scale, within 1e-4 in [-1, 1]; [dev]'s resolution-dependent shift and [schnell]'s none; the distilled guidance
is an input (recorded as Forge writes it), and true CFG with a negative prompt works as diffusers' true_cfg."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from imagine.models.flux import pack_latents
from imagine.pipelines import generate as g
from imagine.pipelines.request import load_text_model
from tests.tiny_sd import write_flux

TOL = 1e-4
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux") / "pipe"
    pipe = write_flux(folder, dev=request.param)
    model, encoder = load_text_model(folder)
    return request.param, folder, pipe, model, encoder


def _noise(seed: int, n: int, side: int = 8) -> torch.Tensor:
    return torch.stack([torch.randn((16, side, side), generator=torch.Generator().manual_seed(seed + i))
                        for i in range(n)])


def test_the_folder_is_read_as_flux(tiny):
    dev, _, _, model, _ = tiny
    spec = model.spec
    assert model.arch == "flux" and model.family.network == "flux" and spec.prediction == "flow"
    assert spec.flow_dynamic_shift == dev and spec.flow_grid_end == "steps"
    assert (spec.default_cfg, spec.default_steps, spec.image_size) == (1.0, 28 if dev else 4, 256)


def test_prompt_encoding_matches_diffusers(tiny):
    _, _, pipe, _, encoder = tiny
    want, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, max_sequence_length=512)
    got = encoder.encode([PROMPT])
    assert got.context.shape == want.shape and (got.context - want).abs().max() < 1e-5
    assert (got.pooled - pooled).abs().max() < 1e-5


@pytest.mark.parametrize("side", [8, 12])
def test_pipeline_matches_diffusers(tiny, side):
    """16 and 24 px: the dynamic shift follows the image's token count."""
    dev, _, pipe, model, encoder = tiny
    s = g.Settings(prompt=PROMPT, steps=4, sampler="euler", cfg_scale=1.0, distilled_cfg_scale=2.5, seed=3, n=2,
                   width=2 * side, height=2 * side)
    ours = g.txt2img(model, s, encoder)
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=2.5, latents=pack_latents(_noise(3, 2, side)),
               height=2 * side, width=2 * side, output_type="np", num_images_per_prompt=2).images
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2) * 2 - 1
    assert (ours - ref).abs().max().item() <= TOL
    text, _ = g.describe(model, s, "txt2img", 0, encoder)
    assert ("Distilled CFG Scale: 2.5" in text) == dev


def test_true_cfg_with_a_negative_prompt_matches_diffusers(tiny):
    _, _, pipe, model, encoder = tiny
    s = g.Settings(prompt=PROMPT, negative_prompt="blurry", steps=3, sampler="euler", cfg_scale=3.0, seed=1,
                   width=16, height=16)
    ours = g.txt2img(model, s, encoder)
    ref = pipe(PROMPT, negative_prompt="blurry", true_cfg_scale=3.0, num_inference_steps=3, guidance_scale=3.5,
               latents=pack_latents(_noise(1, 1)), height=16, width=16, output_type="np").images
    ref = torch.from_numpy(ref).permute(0, 3, 1, 2) * 2 - 1
    assert (ours - ref).abs().max().item() <= TOL


def test_the_cli_regenerates_a_flux_png(tiny, tmp_path):
    import numpy as np
    from PIL import Image

    from tests.e2e.inprocess import imagine

    _, folder, _, _, _ = tiny
    run = imagine("generate", PROMPT, "--model", folder, "--steps", 2, "--distilled-cfg", 4, "--width", 16,
                  "--height", 16, "--out", "a", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    png = next((tmp_path / "a").glob("*.png"))
    again = imagine("generate", "--from", png, "--out", "b", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(next((tmp_path / "b").glob("*.png")))))


def test_a1111_api_takes_forges_distilled_cfg(tiny):
    """A Forge client's txt2img payload (distilled_cfg_scale) is served, pixels equal to the pipeline's."""
    import base64
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from imagine.pipelines.unconditional import to_uint8
    from imagine.server.app import create_app

    dev, folder, _, model, encoder = tiny
    want = to_uint8(g.txt2img(model, g.Settings(prompt=PROMPT, steps=2, seed=5, sampler="euler", cfg_scale=1,
                                                distilled_cfg_scale=5.0, width=16, height=16), encoder))[0]
    with TestClient(create_app([folder], out_dir=None)) as client:
        made = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "seed": 5, "sampler_name": "Euler",
                                                       "cfg_scale": 1, "distilled_cfg_scale": 5.0, "width": 16,
                                                       "height": 16})
        assert made.status_code == 200, made.text
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(made.json()["images"][0]))))
        assert np.array_equal(served, want)
        assert ("Distilled CFG Scale: 5" in made.json()["info"]) == dev


def test_the_models_api_says_what_a_flux_model_takes(tiny):
    """GET /api/v1/models tells the web UI which fields act on each model (it disables or hides the rest):
    Flux reads no clip skip and takes no ControlNet of ours; [dev] reads the distilled guidance."""
    from fastapi.testclient import TestClient

    from imagine.server.app import create_app

    dev, folder, _, _, _ = tiny
    with TestClient(create_app([folder], out_dir=None)) as client:
        takes = client.get("/api/v1/models").json()["models"][0]["takes"]
    assert takes["distilled_cfg_scale"] == dev and not takes["clip_skip"] and takes["lora"]
    assert not (takes["controlnet"] or takes["ip_adapter"] or takes["t2i_adapter"])


def _save_state(state: dict, path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def test_flux_single_files_as_forge_and_comfyui_users_keep_them(tmp_path):
    """A Flux transformer file in Black Forest Labs' layout (diffusers' own converter reads it to the same
    tensors) in models/Stable-diffusion/, with clip_l, t5xxl and ae files in models/text_encoders/ and VAE/ (and
    T5's tokenizer beside the transformer): it loads to the diffusers folder's very pixels; an all-in-one file
    does too; a missing part is named."""
    import shutil

    from diffusers.loaders import single_file_utils as sfu

    from imagine.io import flux_files
    from imagine.io.ldm_keys import vae_map, write_mapped
    from imagine.io.stable_diffusion import load_single_file

    write_flux(tmp_path / "pipe", dev=True, inferable=True)
    model, encoder = load_text_model(tmp_path / "pipe")
    net = model.unet
    original = write_mapped(net.state_dict(), flux_files.transformer_map(net.config))
    d, mlp = net.config.inner_dim, 4 * net.config.inner_dim
    real_split = torch.split

    def split(t, sizes, dim=0):  # diffusers' converter assumes Flux's full widths for linear1's pieces
        return real_split(t, (d, d, d, mlp) if tuple(sizes) == (3072, 3072, 3072, 12288) else sizes, dim)

    torch.split = split
    try:
        theirs = sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    finally:
        torch.split = real_split
    ours = net.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)

    models = tmp_path / "models"
    transformer = models / "Stable-diffusion" / "flux-tiny.safetensors"
    _save_state(original, transformer)
    s = g.Settings(prompt=PROMPT, steps=2, sampler="euler", cfg_scale=1.0, seed=4, width=16, height=16)
    with pytest.raises(Exception, match=r"has no CLIP-L .*T5-XXL .*its VAE"):
        load_single_file(transformer)
    clip = encoder.model.state_dict()
    _save_state({k if k.startswith("text_model.") else "text_model." + k: v for k, v in clip.items()
                 if not k.endswith("position_ids")}, models / "text_encoders" / "clip_l.safetensors")
    t5 = {k: v for k, v in encoder.t5.model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    _save_state(t5, models / "text_encoders" / "t5xxl_fp16.safetensors")
    with torch.device("meta"):
        vae_keys = list(type(model.vae)(model.vae.config).state_dict())
    _save_state(write_mapped(model.vae.state_dict(), vae_map(vae_keys, model.vae.config, "")),
                models / "VAE" / "ae.safetensors")
    with pytest.raises(Exception, match="needs its tokenizer"):
        load_single_file(transformer)
    shutil.copytree(tmp_path / "pipe" / "tokenizer_2", transformer.parent / "tokenizer_2")
    loaded = load_single_file(transformer)
    assert loaded.arch == "flux" and loaded.spec.distilled_guidance and loaded.spec.flow_dynamic_shift
    want = g.txt2img(model, s, encoder)
    assert torch.equal(g.txt2img(loaded, s, loaded.text_encoder), want)
    # ComfyUI's all-in-one save: everything in one file, the transformer under model.diffusion_model.
    everything = {"model.diffusion_model." + k: v for k, v in original.items()}
    everything.update({flux_files.CLIP_L + (k if k.startswith("text_model.") else "text_model." + k): v
                       for k, v in clip.items() if not k.endswith("position_ids")})
    everything.update({flux_files.T5 + k: v for k, v in t5.items()})
    everything.update({"vae." + k: v for k, v in write_mapped(model.vae.state_dict(),
                                                              vae_map(vae_keys, model.vae.config, "")).items()})
    _save_state(everything, tmp_path / "aio" / "flux-aio.safetensors")
    shutil.copytree(tmp_path / "pipe" / "tokenizer_2", tmp_path / "aio" / "tokenizer_2")
    aio = load_single_file(tmp_path / "aio" / "flux-aio.safetensors")
    assert torch.equal(g.txt2img(aio, s, aio.text_encoder), want)


def test_img2img_matches_diffusers(tiny):
    """img2img from the same starting latents and noise equals FluxImg2ImgPipeline within 1e-4, [dev] with its
    distilled guidance and resolution-dependent shift, [schnell] without."""
    import numpy as np
    from diffusers import FluxImg2ImgPipeline
    from PIL import Image

    _, folder, _, model, encoder = tiny
    pipe = FluxImg2ImgPipeline.from_pretrained(folder)
    init = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8"))
    s = g.Settings(prompt=PROMPT, steps=5, sampler="euler", cfg_scale=1.0, seed=3, width=16, height=16,
                   strength=0.6, distilled_cfg_scale=3.5)
    ours = g.img2img(model, s, init, encoder)
    latents = g._encode(model, g._image_tensor(init, (16, 16), 3))
    want = pipe(PROMPT, image=latents, strength=0.6, num_inference_steps=5, guidance_scale=3.5, height=16, width=16,
                generator=torch.Generator().manual_seed(3), output_type="pt",
                max_sequence_length=512).images * 2 - 1
    assert (ours - want).abs().max().item() < TOL
