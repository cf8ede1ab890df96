"""The SDXL refiner (issue 37) held to diffusers on tiny random models built offline: the refiner folder
(StableDiffusionXLImg2ImgPipeline without CLIP-L) loads with OpenCLIP bigG alone and the aesthetic score among its
time ids, and SDXL base + refiner with the switch at 0.8 equals diffusers' base pipeline run to denoising_end and
the refiner pipeline from denoising_start, within 1e-4; a refiner of another latent space is refused."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from imagine.pipelines import generate as g
from imagine.pipelines.request import load_text_model
from tests.tiny_sd import write_pipeline, write_refiner

TOL = 1e-4
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("refiner")
    base = write_pipeline("sdxl", root / "base")
    refiner = write_refiner(root / "refiner", vae=base.vae)
    return root, base, refiner, load_text_model(root / "base"), load_text_model(root / "refiner")


def _noise(seed: int, n: int) -> torch.Tensor:
    return torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


def test_the_refiner_folder_reads_as_the_refiner(pair):
    _, _, pipe, _, (model, encoder) = pair
    assert model.arch == "sdxl-refiner" and model.family.aesthetic_score == (6.0, 2.5)
    cond = model.family.conditioning(torch.zeros(1, 32), 16, 16)
    uncond = model.family.conditioning(torch.zeros(1, 32), 16, 16, negative=True)
    assert cond["time_ids"].tolist() == [[16, 16, 0, 0, 6.0]] and uncond["time_ids"].tolist() == [[16, 16, 0, 0, 2.5]]
    want, negative, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=True, negative_prompt="blurry")
    got = encoder.encode([PROMPT, "blurry"])
    assert (got.context[:1] - want).abs().max() < 1e-5 and (got.context[1:] - negative).abs().max() < 1e-5
    assert (got.pooled[:1] - pooled).abs().max() < 1e-5


@pytest.mark.parametrize("switch_at", [0.8, 0.5])
def test_base_then_refiner_matches_diffusers(pair, switch_at):
    _, base_pipe, refiner_pipe, (base, base_encoder), refiner = pair
    s = g.Settings(prompt=PROMPT, negative_prompt="blurry", steps=5, sampler="euler", cfg_scale=5.0, seed=3, n=2,
                   width=16, height=16, refiner="refiner", refiner_switch_at=switch_at)
    ours = g.txt2img(base, s, base_encoder, refiner=refiner)
    # the same x_T: imagine starts at noise * sqrt(1 + sigma_max^2); diffusers' Euler multiplies the latents it is
    # given by its init_noise_sigma (sigma_max under trailing spacing), as tests/parity/test_stable_diffusion.py says
    base_pipe.scheduler.set_timesteps(5)
    sigma_max = float(base_pipe.scheduler.sigmas[0])
    start = _noise(3, 2) * (1 + sigma_max**2) ** 0.5 / float(base_pipe.scheduler.init_noise_sigma)
    latents = base_pipe(PROMPT, negative_prompt="blurry", num_inference_steps=5, guidance_scale=5.0,
                        denoising_end=switch_at, latents=start,
                        height=16, width=16, num_images_per_prompt=2, output_type="latent").images
    want = refiner_pipe([PROMPT] * 2, negative_prompt=["blurry"] * 2, image=latents, num_inference_steps=5,
                        denoising_start=switch_at, guidance_scale=5.0, num_images_per_prompt=1,
                        output_type="pt").images * 2 - 1
    assert (ours - want).abs().max().item() < TOL
    alone = g.txt2img(base, g.Settings(**{**s.to_dict(), "refiner": None}), base_encoder)
    assert (alone - ours).abs().max().item() > 1e-3, "the refiner changed nothing"


def test_a_refiner_of_another_latent_space_is_refused(pair, tmp_path):
    _, _, _, (base, _), _ = pair
    write_pipeline("sd1", tmp_path / "sd1")
    other, _ = load_text_model(tmp_path / "sd1")
    with pytest.raises(ValueError, match="another latent space"):
        g.check_refiner(base, other)


def test_the_refiner_through_the_cli_and_both_apis(pair, tmp_path):
    """--refiner on the CLI, recorded as A1111 writes it, --from bit for bit; A1111's refiner_checkpoint and
    refiner_switch_at and the job API's refiner on a server serving both models; an unknown refiner is a 404."""
    import base64

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from imagine.io.png import read_png_metadata
    from imagine.server import Limits, create_app
    from tests.e2e.inprocess import imagine

    root = pair[0]
    run = imagine("generate", PROMPT, "--model", root / "base", "--refiner", root / "refiner", "--refiner-switch-at",
                  0.6, "--steps", 4, "--width", 16, "--height", 16, "--out", tmp_path / "o")
    assert run.returncode == 0, run.stderr[-2000:]
    png = run.stdout.split()[-1]
    text, record = read_png_metadata(png)
    assert "Refiner: refiner [" in text and "Refiner switch at: 0.6" in text
    assert record["refiner"]["arch"] == "sdxl-refiner" and record["settings"]["refiner_switch_at"] == 0.6
    again = imagine("generate", "--from", png, "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(again.stdout.split()[-1])), np.asarray(Image.open(png)))
    wrong = imagine("generate", PROMPT, "--model", root / "refiner", "--refiner", root / "base", "--steps", 2,
                    "--width", 16, "--height", 16, "--out", tmp_path / "o")
    assert wrong.returncode == 0, "an SDXL base may refine a refiner's first steps: the same latent space"
    app = create_app([root / "base", root / "refiner"], out_dir=None, limits=Limits(max_pixels=64 * 64))
    with TestClient(app) as client:
        body = {"prompt": PROMPT, "steps": 4, "width": 16, "height": 16, "seed": 0, "refiner_checkpoint": "refiner",
                "refiner_switch_at": 0.6}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        info = r.json()["info"]
        assert "Refiner: refiner" in info and "Refiner switch at: 0.6" in info
        _, served = read_png_metadata(base64.b64decode(r.json()["images"][0]))
        assert served["refiner"]["name"] == "refiner"
        r = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "no-such-model"})
        assert r.status_code == 404 and "refiner" in r.text
        r = client.post("/api/v1/jobs", json={"prompt": PROMPT, "steps": 3, "width": 16, "height": 16,
                                              "refiner": "refiner", "refiner_switch_at": 0.5})
        assert r.status_code == 202, r.text


def test_a_refiner_single_file_loads_as_a1111_users_keep_it(pair, tmp_path):
    """The refiner in the original layout (OpenCLIP bigG under conditioner.embedders.0.model., no CLIP-L, a label
    embedding over 5 time ids): told apart by its keys and loaded to the same model (a tiny model's group count is
    in no tensor, so the load reads imagine's metadata; a real refiner's shapes say the rest)."""
    from safetensors.torch import load_file

    from imagine.families import SDXL_REFINER, from_single_file
    from imagine.io.stable_diffusion import save_single_file

    _, _, _, (base, base_encoder), (refiner, refiner_encoder) = pair
    written = save_single_file(refiner, tmp_path / "refiner.safetensors")
    state = load_file(written)
    assert any(k.startswith("conditioner.embedders.0.model.") for k in state)
    assert not any(k.startswith("conditioner.embedders.0.transformer.") for k in state)
    assert from_single_file(state) is SDXL_REFINER
    assert state["model.diffusion_model.label_emb.0.0.weight"].shape[1] == 32 + 5 * 8  # pooled + 5 time ids
    model, encoder = load_text_model(written)
    assert model.arch == "sdxl-refiner"
    s = g.Settings(prompt=PROMPT, steps=4, sampler="euler", cfg_scale=5.0, seed=1, width=16, height=16,
                   refiner="r", refiner_switch_at=0.5)
    a = g.txt2img(base, s, base_encoder, refiner=(refiner, refiner_encoder))
    b = g.txt2img(base, s, base_encoder, refiner=(model, encoder))
    assert (a - b).abs().max().item() < 1e-5
