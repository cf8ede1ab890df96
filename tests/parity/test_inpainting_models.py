"""Inpainting checkpoints (sd-v1-5-inpainting, SD 2 and SDXL inpainting: 9-channel UNets that read the mask and
the masked image's latents beside the noisy latent), proven on tiny random StableDiffusionInpaintPipeline /
StableDiffusionXLInpaintPipeline folders built offline: inside the mask, the same pixels as diffusers' pipeline
from the same noise within 1e-4 (outside it, imagine pastes the original back, as A1111 does); the folder and a
single file written from it load to the same model; txt2img and img2img run through A1111's conditioning (a full
mask over mid-grey, or over the init image); the PNG and the A1111 API say it, and --from regenerates it.
InstructPix2Pix (8-channel UNets: the image's latents beside the noisy latent, text and image guidance) equals
StableDiffusionInstructPix2PixPipeline the same way."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from imagine.pipelines import generate as g
from imagine.pipelines.request import load_text_model
from tests.tiny_sd import write_inpaint_pipeline

TOL = 1e-4
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inpaint") / request.param
    pipe = write_inpaint_pipeline(request.param, folder)
    model, encoder = load_text_model(folder)
    return request.param, folder, pipe, model, encoder


def _image_and_mask():
    image = Image.fromarray((np.random.default_rng(1).random((16, 16, 3)) * 255).astype("uint8"))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 2, 12, 10))
    return image, mask


def test_an_inpainting_model_matches_diffusers_inside_the_mask(tiny):
    """At strength 0.75 (the image's latents noised to the start of the last steps, as both do; at strength 1
    diffusers starts from pure noise where imagine, as A1111, still adds the noise to the init latent)."""
    _, _, pipe, model, encoder = tiny
    assert model.spec.conditioning_channels == 5 and model.unet.config.in_channels == 9
    image, mask = _image_and_mask()
    s = g.Settings(prompt=PROMPT, negative_prompt="blurry", steps=4, sampler="euler", cfg_scale=5.0, seed=3,
                   width=16, height=16, strength=0.75, mask_blur=0, inpaint_fill="original")
    ours = g.inpaint(model, s, image, mask, encoder)
    original = g._image_tensor(image, (16, 16), 3)
    binary = (g._blurred(mask, (16, 16), 0) >= 0.5).float()
    masked_latents = g._encode(model, original * (1 - binary))
    # the VAE's posterior mean on both sides (diffusers samples it with the noise's generator)
    pipe._encode_vae_image = lambda image, generator: g._encode(model, image.float())
    want = pipe(PROMPT, negative_prompt="blurry", image=image, mask_image=mask, masked_image_latents=masked_latents,
                num_inference_steps=4, guidance_scale=5.0, strength=0.75, height=16, width=16,
                generator=torch.Generator().manual_seed(3), output_type="pt").images * 2 - 1
    inside = binary[0, 0].bool()
    assert (ours[0][:, inside] - want[0][:, inside]).abs().max().item() < TOL
    assert torch.equal(ours[0][:, ~inside], original[0][:, ~inside])  # outside: the original, pasted back


def test_inpainting_models_through_the_doors(tiny, tmp_path):
    """txt2img, img2img and inpaint through the CLI; the PNG records A1111's "Conditional mask weight" and --from
    regenerates it; the mask weight changes what the model sees; a single file written from the folder loads
    to the same model."""
    from imagine.io.stable_diffusion import load_single_file, save_single_file
    from tests.e2e.inprocess import imagine

    _, folder, _, model, encoder = tiny
    image, mask = _image_and_mask()
    image.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    run = imagine("inpaint", tmp_path / "init.png", tmp_path / "mask.png", PROMPT, "--model", folder, "--steps", 3,
                  "--mask-weight", 0.5, "--out", "a", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    png = next((tmp_path / "a").glob("*.png"))
    assert "Conditional mask weight: 0.5" in Image.open(png).info["parameters"]
    again = imagine("generate", "--from", png, "--out", "b", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(next((tmp_path / "b").glob("*.png")))))
    for kind in (["generate", PROMPT], ["img2img", tmp_path / "init.png", PROMPT]):
        run = imagine(*kind, "--model", folder, "--steps", 2, "--width", 16, "--height", 16, "--out", kind[0],
                      cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
    s = g.Settings(prompt=PROMPT, steps=2, sampler="euler", cfg_scale=5.0, seed=1, width=16, height=16,
                   strength=0.8)
    full, half = (g.img2img(model, replace(s, inpainting_mask_weight=w), image, encoder) for w in (1.0, 0.0))
    assert (full - half).abs().max() > 1e-3
    out = save_single_file(model, tmp_path / "inpaint.safetensors")
    loaded = load_single_file(out)
    assert loaded.spec.conditioning_channels == 5
    assert torch.equal(g.txt2img(loaded, s, loaded.text_encoder), g.txt2img(model, s, encoder))


def test_the_a1111_api_takes_inpainting_models(tiny, tmp_path):
    """A1111's img2img with a mask on an inpainting checkpoint: is_using_inpainting_conditioning, and its
    inpainting_mask_weight option (override_settings) reaching the image; the models API says it takes it."""
    import base64
    import io
    import json

    from fastapi.testclient import TestClient

    from imagine.server.app import create_app

    _, folder, _, _, _ = tiny
    image, mask = _image_and_mask()

    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    body = {"prompt": PROMPT, "init_images": [b64(image)], "mask": b64(mask), "steps": 2, "seed": 4,
            "denoising_strength": 0.8, "width": 16, "height": 16, "mask_blur": 0}
    with TestClient(create_app([folder], out_dir=None)) as client:
        assert client.get("/api/v1/models").json()["models"][0]["takes"]["inpainting_mask_weight"]
        made = [client.post("/sdapi/v1/img2img", json={**body, "override_settings": {"inpainting_mask_weight": w}})
                for w in (1.0, 0.25)]
        for r in made:
            assert r.status_code == 200, r.text
            assert json.loads(r.json()["info"])["is_using_inpainting_conditioning"]
        assert "Conditional mask weight: 0.25" in json.loads(made[1].json()["info"])["infotexts"][0]
        assert made[0].json()["images"][0] != made[1].json()["images"][0]


def test_instruct_pix2pix_matches_diffusers(tmp_path):
    """An 8-channel InstructPix2Pix UNet: the image's unscaled latents beside the noisy latent and three branches
    (prompt + image, negative + image, negative alone) combined with the text and image guidance scales; from pure
    noise at strength 1, the same image as StableDiffusionInstructPix2PixPipeline within 1e-4; A1111's
    image_cfg_scale and the PNG's "Image CFG scale"; txt2img and inpaint refused, saying what to do."""
    import base64
    import io
    import json

    from fastapi.testclient import TestClient

    from imagine.server.app import create_app
    from tests.tiny_sd import write_instruct_pipeline

    pipe = write_instruct_pipeline(tmp_path / "ip2p")
    model, encoder = load_text_model(tmp_path / "ip2p")
    assert model.spec.conditioning_channels == 4
    image, mask = _image_and_mask()
    s = g.Settings(prompt="make it blue", negative_prompt="", steps=4, sampler="euler", cfg_scale=7.5, seed=3,
                   width=16, height=16, strength=1.0, image_cfg_scale=1.5)
    ours = g.img2img(model, s, image, encoder)
    noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(3))[None]
    # imagine starts at noise x sqrt(1 + sigma_max^2) (the VP sample); diffusers' Euler multiplies what it is
    # given by sigma_max under trailing spacing (tests/parity/test_stable_diffusion.py says the same)
    pipe.scheduler.set_timesteps(4)
    sigma_max = float(pipe.scheduler.sigmas[0])
    noise = noise * (1 + sigma_max**2) ** 0.5 / float(pipe.scheduler.init_noise_sigma)
    want = pipe("make it blue", image=image, num_inference_steps=4, guidance_scale=7.5, image_guidance_scale=1.5,
                latents=noise, output_type="pt").images * 2 - 1
    assert (ours - want).abs().max().item() < TOL
    assert (ours - g.img2img(model, replace(s, image_cfg_scale=3.0), image, encoder)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="use img2img"):
        g.txt2img(model, s, encoder)
    with pytest.raises(ValueError, match="use img2img"):
        g.inpaint(model, s, image, mask, encoder)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    body = {"prompt": "make it blue", "init_images": [base64.b64encode(buf.getvalue()).decode()], "steps": 2,
            "seed": 4, "denoising_strength": 1.0, "image_cfg_scale": 2.0, "width": 16, "height": 16}
    with TestClient(create_app([tmp_path / "ip2p"], out_dir=None)) as client:
        assert client.get("/api/v1/models").json()["models"][0]["takes"]["image_cfg_scale"]
        made = client.post("/sdapi/v1/img2img", json=body)
        assert made.status_code == 200, made.text
        assert "Image CFG scale: 2" in json.loads(made.json()["info"])["infotexts"][0]
