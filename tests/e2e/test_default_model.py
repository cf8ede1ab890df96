"""The model shipped inside the package: small, fp16, and `imagine generate PROMPT` works with no flags.
Also reranking with a CLIP scorer, through the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from imagine.io.png import read_png_metadata
from imagine.weights import DEFAULT_CLIP, DEFAULT_MODEL
from tests.e2e.inprocess import imagine

_cli = imagine  # in-process (tests/e2e/inprocess.py)


def test_shipped_model_is_fp16_and_under_40_mb():
    files = [DEFAULT_MODEL / "unet" / "model.safetensors", DEFAULT_MODEL / "vae" / "model.safetensors"]
    assert sum(f.stat().st_size for f in files) <= 40 * 1024 * 1024
    for f in files:
        with safe_open(str(f), framework="pt") as weights:
            dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}
        assert dtypes == {"F16"}, (f, dtypes)


def test_generate_with_no_flags_uses_the_shipped_model(tmp_path):
    run = _cli("generate", "a red circle above a blue square", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    written = sorted((tmp_path / "outputs").glob("*.png"))
    assert [p.name for p in written] == ["000000-txt2img.png"]
    image = np.asarray(Image.open(written[0]).convert("RGB"))
    assert image.shape[0] >= 64 and image.shape[1] >= 64 and image.std() > 5  # a picture, not a flat field
    parameters, record = read_png_metadata(written[0])
    assert "Model: shapes-default" in parameters and record["model"]["name"] == "shapes-default"
    # no flags: the model's own defaults (its diffusion.json), not the library's
    assert (record["settings"]["steps"], record["settings"]["sampler"], record["settings"]["cfg_scale"]) == \
        (25, "dpmpp_2m", 3.0)


def test_rerank_keeps_the_best_candidate_and_it_regenerates_alone(tiny_t2i_dir, tmp_path):
    from imagine.models.text_encoders import default_text_encoder
    from imagine.train.clip import CLIP_PRESETS, train_clip

    train_clip(CLIP_PRESETS["tiny"], tmp_path / "clip", default_text_encoder())
    out = tmp_path / "out"
    run = _cli("generate", "a red circle", "--model", str(tiny_t2i_dir), "--clip", str(tmp_path / "clip"),
               "--rerank", "3", "--n", "2", "--seed", "10", "--steps", "4", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    kept = sorted(out.glob("*.png"))
    assert len(kept) == 2
    for i, path in enumerate(kept):
        _, record = read_png_metadata(path)
        rerank = record["rerank"]
        assert rerank["k"] == 3 and len(rerank["scores"]) == 3
        assert rerank["scores"][rerank["chosen"]] == max(rerank["scores"])
        assert record["settings"]["seed"] == 10 + 3 * i + rerank["chosen"]
        again = _cli("generate", "--from", str(path), "--out", str(tmp_path / "again"))
        assert again.returncode == 0, again.stderr[-2000:]
        regenerated = sorted((tmp_path / "again").glob("*.png"))[-1]
        assert np.array_equal(np.asarray(Image.open(regenerated)), np.asarray(Image.open(path)))
    assert _cli("generate", "x", "--model", str(tiny_t2i_dir), "--rerank", "0").returncode == 2


def test_the_shipped_weights_are_all_there():
    """A missing shipped weight is a broken install: a failure here, never a skip elsewhere."""
    for path in (DEFAULT_MODEL / "diffusion.json", DEFAULT_MODEL / "unet" / "model.safetensors",
                 DEFAULT_MODEL / "vae" / "model.safetensors", DEFAULT_CLIP / "model.safetensors",
                 DEFAULT_CLIP / "config.json"):
        assert path.is_file(), f"{path} is missing from the package"


def test_shipped_model_regression_floor():
    """ShapesEval of the shipped model at its defaults on a fixed set (4 prompts per category, seed 0):
    16 of 24 (0.667) when measured (11 before its language stage); a change that costs more than two prompts
    fails here."""
    from imagine.evaluation.shapes_eval import evaluate_model, prompt_set
    from imagine.pipelines.generate import Settings
    from imagine.pipelines.request import load_text_model

    model, encoder = load_text_model(DEFAULT_MODEL)
    report = evaluate_model(model, encoder, prompt_set(4, 0), Settings().with_model_defaults(model.spec, None, None,
                                                                                          None))
    assert report.overall >= 14 / 24, report.table()
    assert report.categories()["single_object"] >= 0.75, report.table()


def test_shipped_clip_scorer_retrieval_floor():
    """The shipped scorer finds each held-out scene's caption among 64 (chance: 1/64): measured 0.97
    image to caption and 1.00 caption to image; the floor is 0.85."""
    import torch

    from imagine.data.shapes import ShapesDataset
    from imagine.io.networks import load_clip
    from imagine.models.clip import CLIPScorer
    from imagine.models.text_encoders import default_text_encoder

    scorer = CLIPScorer(load_clip(DEFAULT_CLIP), default_text_encoder())
    ds = ShapesDataset(64)
    scenes = [ds.scene(90_000_000 + i) for i in range(64)]
    images = torch.stack([torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 127.5 - 1 for _, img in scenes])
    captions = [scene.caption for scene, _ in scenes]
    sim = scorer.similarity(images, captions)
    image_to_text = sum(captions[int(k)] == captions[i] for i, k in enumerate(sim.argmax(1))) / 64
    text_to_image = sum(captions[int(k)] == captions[i] for i, k in enumerate(sim.argmax(0))) / 64
    assert image_to_text >= 0.85 and text_to_image >= 0.85, (image_to_text, text_to_image)


@pytest.mark.slow  # over 10 s here: `pytest -m slow` runs it (CI's suite stays under 10 minutes)
def test_inpainting_draws_the_asked_object_inside_the_mask():
    """The shipped model, 12 of benchmarks/inpaint_eval.py's cases (a scene with one object, the other half
    masked, "a COLOR SHAPE" asked): at its defaults (latent-noise masked content) the object is drawn inside
    the mask in 6 (the benchmark's 40: 0.62); starting from the original, as A1111's default does, in 2 (0.25),
    which left the region empty. Every kept object stays."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from imagine.pipelines.generate import Settings, inpaint
    from imagine.pipelines.request import load_text_model
    from imagine.pipelines.unconditional import to_uint8
    from inpaint_eval import cases, judge_inpaint

    model, encoder = load_text_model(DEFAULT_MODEL)
    base = Settings().with_model_defaults(model.spec, None, None, None)
    assert base.inpaint_fill == "latent_noise"
    drawn = {}
    for fill in ("latent_noise", "original"):
        verdicts = [judge_inpaint(c, to_uint8(inpaint(model, Settings(**{**base.to_dict(), "prompt": c["prompt"],
                                                                         "seed": c["seed"], "inpaint_fill": fill}),
                                                      c["image"], c["mask"], encoder))[0]) for c in cases(12)]
        assert sum(kept for _, kept in verdicts) >= 11
        drawn[fill] = sum(d for d, _ in verdicts)
    assert drawn["latent_noise"] >= 5 and drawn["latent_noise"] >= drawn["original"] + 3, drawn
