"""Flow matching trains through the same loop as every other objective: `imagine train --prediction flow`
learns, records what it is, resumes exactly, and its model samples with every sampler through the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from imagine.io.model_folder import load_model_folder
from imagine.train.loop import read_log
from tests.e2e.inprocess import imagine

TRAIN = ["train", "--data", "builtin:digits", "--preset", "tiny", "--sample-every", "0", "--prediction", "flow"]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "m"
    run = imagine(*TRAIN, "--out", out, "--steps", 30, "--flow-shift", 2.0, "--checkpoint-every", 15)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def test_flow_training_learns_and_records_what_it_is(flow_run):
    losses = [r["loss"] for r in read_log(flow_run / "log.jsonl")]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    spec = json.loads((flow_run / "diffusion.json").read_text())
    assert spec["prediction"] == "flow" and spec["flow_shift"] == 2.0


def test_a_flow_run_resumes_exactly(flow_run, tmp_path):
    out = tmp_path / "r"
    assert imagine(*TRAIN, "--out", out, "--steps", 15, "--flow-shift", 2.0, "--checkpoint-every", 15).returncode == 0
    resumed = imagine(*TRAIN, "--out", out, "--steps", 30, "--flow-shift", 2.0, "--checkpoint-every", 15,
                      "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_model_folder(flow_run).unet.state_dict()
    b = load_model_folder(out).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "euler_a", "unipc"])
def test_a_flow_model_samples_with_any_sampler(flow_run, tmp_path, sampler):
    run = imagine("sample", "--model", flow_run, "--n", 2, "--steps", 4, "--sampler", sampler, "--class", 3,
                  "--cfg", 2.0, "--out", tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    from PIL import Image

    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2
    pixels = np.asarray(Image.open(pngs[0]))
    assert pixels.std() > 5  # an image, not a flat field or NaNs


def test_flow_refuses_what_it_cannot_take(tmp_path):
    run = imagine(*TRAIN, "--out", tmp_path / "x", "--steps", 2, "--min-snr-gamma", 5)
    assert run.returncode != 0 and "min_snr_gamma" in run.stderr
    run = imagine(*TRAIN, "--out", tmp_path / "y", "--steps", 2, "--flow-density", "gaussian")
    assert run.returncode != 0 and "flow density 'gaussian' unknown" in run.stderr


def test_a_dit_trains_with_flow_resumes_exactly_and_samples(tmp_path):
    """The transformer half through the same loop: DiT (adaLN-Zero) on builtin:digits, flow matching."""
    common = ["train", "--data", "builtin:digits", "--preset", "tiny-dit", "--sample-every", "0", "--prediction",
              "flow", "--checkpoint-every", 10]
    run = imagine(*common, "--out", tmp_path / "a", "--steps", 30)
    assert run.returncode == 0, run.stderr[-2000:]
    losses = [r["loss"] for r in read_log(tmp_path / "a" / "log.jsonl")]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])  # 1.63 -> 1.15 measured (adaLN-Zero starts slow)
    config = json.loads((tmp_path / "a" / "unet" / "config.json").read_text())
    assert config["_class"] == "DiTTransformer2DModel" and config["num_embeds_ada_norm"] == 10
    assert imagine(*common, "--out", tmp_path / "b", "--steps", 20).returncode == 0
    assert imagine(*common, "--out", tmp_path / "b", "--steps", 30, "--resume").returncode == 0
    a, b = (load_model_folder(tmp_path / d).unet.state_dict() for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    run = imagine("sample", "--model", tmp_path / "a", "--n", 2, "--steps", 4, "--class", 7, "--cfg", 2.0,
                  "--out", tmp_path / "s")
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(list((tmp_path / "s").glob("*.png"))) == 2
    refused = imagine("train", "--data", "builtin:shapes-language", "--preset", "tiny-t2i", "--arch", "dit",
                      "--steps", 1, "--out", tmp_path / "c")
    assert refused.returncode != 0 and "class-conditional network" in refused.stderr


@pytest.mark.parametrize("arch", ["pixart", "mmdit", "flux"])
def test_text_transformers_train_generate_and_regenerate(arch, tmp_path):
    """PixArt's DiT, SD3's MMDiT and Flux's double/single-stream transformer, text-conditioned with imagine's
    encoder (the pooled input of MMDiT and Flux: the tokens' masked mean), trained with flow matching in a VAE's
    latents; a PNG regenerates bit for bit."""
    out = tmp_path / "m"
    run = imagine("train", "--data", "builtin:shapes-language", "--preset", "tiny-t2i", "--arch", arch,
                  "--prediction", "flow", "--steps", 4, "--out", out)
    assert run.returncode == 0, run.stderr[-2000:]
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["_class"] == {"pixart": "PixArtTransformer2DModel", "mmdit": "SD3Transformer2DModel",
                                "flux": "FluxTransformer2DModel"}[arch]
    model = load_model_folder(out)
    assert model.family.network == arch and model.spec.prediction == "flow"
    made = imagine("generate", "a red circle", "--model", out, "--steps", 3, "--sampler", "euler", "--out",
                   tmp_path / "a")
    assert made.returncode == 0, made.stderr[-2000:]
    png = next((tmp_path / "a").glob("*.png"))
    again = imagine("generate", "--from", png, "--out", tmp_path / "b")
    assert again.returncode == 0, again.stderr[-2000:]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(next((tmp_path / "b").glob("*.png")))))
    refused = imagine("generate", "x", "--model", out, "--steps", 2, "--control", "canny:" + str(png), "--out",
                      tmp_path / "c")
    assert refused.returncode != 0


def test_the_doors_serve_a_transformer_flow_model(tmp_path):
    """The job API and A1111's API take an MMDiT flow model with no branch of their own: the family says what it
    takes, model_sampling how it is walked; the served pixels equal the pipeline's."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from imagine.models.text_encoders import load_text_encoder
    from imagine.pipelines.generate import txt2img
    from imagine.pipelines.settings import Settings
    from imagine.pipelines.unconditional import to_uint8
    from imagine.server.app import create_app

    out = tmp_path / "mmdit"
    run = imagine("train", "--data", "builtin:shapes-language", "--preset", "tiny-t2i", "--arch", "mmdit",
                  "--prediction", "flow", "--steps", 3, "--out", out)
    assert run.returncode == 0, run.stderr[-2000:]
    with TestClient(create_app([out], out_dir=None)) as client:
        made = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 3, "seed": 5,
                                                       "sampler_name": "Euler", "cfg_scale": 2})
        assert made.status_code == 200, made.text
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(made.json()["images"][0]))))
        job = client.post("/api/v1/jobs", json={"prompt": "a red circle", "steps": 3, "seed": 5, "sampler": "euler",
                                                "cfg_scale": 2, "backend": "torch"})
        assert job.status_code == 202, job.text
    model = load_model_folder(out)
    want = to_uint8(txt2img(model, Settings(prompt="a red circle", steps=3, seed=5, sampler="euler", cfg_scale=2),
                            load_text_encoder(model.spec.text_encoder)))[0]
    assert np.array_equal(served, want)


def test_text_noise_augments_training_and_resumes_exactly(tmp_path):
    """--text-noise adds per-sample Gaussian noise (times the states' RMS) to the text states: the losses move,
    and a resumed run repeats the straight one (each sample's noise from its own stream)."""
    common = ["--data", "builtin:shapes-language", "--preset", "tiny-t2i", "--prediction", "flow"]
    runs = {}
    for name, extra in (("plain", []), ("noisy", ["--text-noise", 0.5])):
        run = imagine("train", *common, *extra, "--steps", 4, "--out", tmp_path / name)
        assert run.returncode == 0, run.stderr[-2000:]
        runs[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    assert runs["plain"] != runs["noisy"]
    half = imagine("train", *common, "--text-noise", 0.5, "--steps", 2, "--checkpoint-every", 2, "--out",
                   tmp_path / "resumed")
    assert half.returncode == 0, half.stderr[-2000:]
    rest = imagine("train", *common, "--text-noise", 0.5, "--steps", 4, "--checkpoint-every", 2, "--resume", "--out",
                   tmp_path / "resumed")
    assert rest.returncode == 0, rest.stderr[-2000:]
    resumed = [json.loads(line)["loss"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert resumed[-1] == runs["noisy"][-1]
