"""Text to image end to end with a tiny model: reproducibility, img2img, inpaint, metadata, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.a1111 import parse_a1111
from imagine.io.model_folder import load_model_folder
from imagine.io.png import read_png_metadata
from imagine.models.text_encoders import default_text_encoder
from imagine.pipelines.generate import Cancelled, Settings, img2img, inpaint, txt2img
from imagine.pipelines.unconditional import to_uint8
from imagine.samplers import SAMPLERS
from tests.e2e.inprocess import imagine

_cli = imagine  # in-process (tests/e2e/inprocess.py)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "model"
    run = _cli("train", "--data", "builtin:shapes", "--preset", "tiny-t2i", "--out", str(out), "--steps", "10")
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model_folder(model_dir)


@pytest.fixture(scope="module")
def encoder():
    return default_text_encoder()


S = Settings(prompt="a red circle above a blue square", negative_prompt="green", steps=4, cfg_scale=4.0, seed=7)


def test_txt2img_is_reproducible_and_batch_size_invariant(model, encoder):
    for sampler in ("dpmpp_2m", "Euler a", "DPM++ 2M SDE Karras"):
        s = Settings(**{**S.to_dict(), "sampler": sampler})
        once, twice = txt2img(model, s, encoder), txt2img(model, s, encoder)
        assert np.array_equal(to_uint8(once), to_uint8(twice))
        batch = to_uint8(txt2img(model, Settings(**{**s.to_dict(), "n": 4}), encoder))
        for i in range(4):
            alone = to_uint8(txt2img(model, Settings(**{**s.to_dict(), "seed": 7 + i}), encoder))
            assert np.array_equal(batch[i], alone[0]), f"{sampler}: image {i} differs from seed {7 + i} alone"
        assert not np.array_equal(batch[0], batch[1])


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_is_batch_invariant_to_the_last_bit(model, encoder, sampler):
    """The default path runs each step in one network call for the whole batch, yet image i of a batch of 1, 3
    or 8 is seed + i alone, bit for bit (float output, not only 8-bit pixels): with CFG (two rows per image);
    for a stochastic and two deterministic samplers also without (cfg 1: one row, floored at two) and under
    bf16 autocast."""
    variants = [(4.0, "fp32")]
    if sampler in ("dpmpp_2m_sde", "unipc", "lcm"):
        variants += [(1.0, "fp32"), (4.0, "bf16")]
    for cfg, precision in variants:
        s = Settings(**{**S.to_dict(), "sampler": sampler, "steps": 3, "cfg_scale": cfg, "precision": precision,
                        "negative_prompt": "green" if cfg != 1 else ""})
        alone = {i: txt2img(model, Settings(**{**s.to_dict(), "seed": 7 + i}), encoder)[0] for i in (0, 1, 2, 5, 7)}
        for n in (3, 8):
            batch = txt2img(model, Settings(**{**s.to_dict(), "n": n}), encoder)
            for i in (i for i in alone if i < n):
                assert torch.equal(batch[i], alone[i]), f"{sampler} cfg {cfg} {precision}: image {i} of {n}"


def test_callback_every_step_and_cancellation(model, encoder):
    seen = []
    txt2img(model, S, encoder, callback=lambda info: seen.append(info["i"]))
    assert seen == [0, 1, 2, 3]
    calls = []
    with pytest.raises(Cancelled, match="step 3 of 4"):
        txt2img(model, S, encoder, cancel=lambda: calls.append(1) or len(calls) > 2)


def test_img2img_strength(model, encoder):
    init = Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))
    gentle = to_uint8(img2img(model, Settings(**{**S.to_dict(), "strength": 0.25}), init, encoder))[0]
    full = to_uint8(img2img(model, Settings(**{**S.to_dict(), "strength": 1.0}), init, encoder))[0]
    dist = lambda a: np.abs(a.astype(int) - 200).mean()  # noqa: E731
    assert dist(gentle) < dist(full)
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
        img2img(model, Settings(**{**S.to_dict(), "strength": 0.0}), init, encoder)


def test_inpaint_keeps_the_unmasked_pixels_exactly(model, encoder):
    rng = np.random.default_rng(0)
    init_px = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    mask_px = np.zeros((16, 16), dtype=np.uint8)
    mask_px[4:12, 4:12] = 255
    s = Settings(**{**S.to_dict(), "strength": 1.0, "mask_blur": 0})
    out = to_uint8(inpaint(model, s, Image.fromarray(init_px), Image.fromarray(mask_px), encoder))[0]
    keep = mask_px == 0
    assert np.array_equal(out[keep], init_px[keep])
    assert not np.array_equal(out[~keep], init_px[~keep])
    with pytest.raises(ValueError, match="the mask is 8x8 but the image is 16x16"):
        inpaint(model, s, Image.fromarray(init_px), Image.fromarray(mask_px[:8, :8]), encoder)


def test_metadata_round_trip_and_regeneration(model_dir, tmp_path):
    run = _cli("generate", "a (yellow:1.2) star", "--negative", "blue", "--model", str(model_dir), "--steps", "3",
               "--sampler", "DPM++ 2M Karras", "--seed", "11", "--n", "2", "--out", str(tmp_path / "a"))
    assert run.returncode == 0, run.stderr[-2000:]
    second = tmp_path / "a" / "000012-txt2img.png"
    text, record = read_png_metadata(second)
    p = parse_a1111(text)
    assert p["Prompt"] == "a (yellow:1.2) star" and p["Negative prompt"] == "blue"
    assert p["Seed"] == "12" and p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras"
    assert p["Steps"] == "3" and p["Size"] == "16x16" and len(p["Model hash"]) == 10
    assert record["settings"]["seed"] == 12 and record["model"]["text_encoder"] == "all-MiniLM-L6-v2"
    info = _cli("info", str(second))
    assert info.returncode == 0 and "Seed: 12" in info.stdout and '"seed": 12' in info.stdout
    again = _cli("generate", "--from", str(second), "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr[-2000:]
    regenerated = tmp_path / "b" / "000012-txt2img.png"
    assert np.array_equal(np.asarray(Image.open(second)), np.asarray(Image.open(regenerated)))
    twice = _cli("generate", "--from", str(second), "--out", str(tmp_path / "b"))
    assert "000012-txt2img-1.png" in twice.stdout  # never overwrites


def test_bad_input_fails_clearly_and_writes_nothing(model_dir, tmp_path):
    out = tmp_path / "out"
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(img)
    small_mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(small_mask)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    (tmp_path / "empty").mkdir()
    cases = [
        (["generate", "x", "--model", str(model_dir), "--width", "17"], "not a positive multiple of 2"),
        (["inpaint", str(img), str(small_mask), "x", "--model", str(model_dir)], "must be the same size"),
        (["img2img", str(img), "x", "--strength", "1.5", "--model", str(model_dir)], "strength must lie in (0, 1]"),
        (["img2img", str(img), "x", "--strength", "0", "--model", str(model_dir)], "strength must lie in (0, 1]"),
        (["img2img", str(tmp_path / "junk.png"), "x", "--model", str(model_dir)], "is not an image"),
        (["generate", "x", "--model", str(tmp_path / "empty")], "neither an imagine model folder (diffusion.json) nor "
                                                                "a diffusers pipeline folder"),
        (["generate", "x", "--model", str(model_dir), "--sampler", "eulr"], "sampler 'eulr' unknown"),
        (["info", str(tmp_path / "junk.png")], "cannot read"),
    ]
    for args, message in cases:
        run = _cli(*args, "--out", str(out)) if args[0] != "info" else _cli(*args)
        assert run.returncode == 2, (args, run.stderr[-1000:])
        assert message in run.stderr, (args, run.stderr[-1000:])
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow  # inductor compiles for tens of seconds on 2 cores
def test_compiled_unet_matches_eager_and_is_compiled_once(model, encoder):
    from imagine.pipelines import generate as g

    eager = txt2img(model, S, encoder)
    compiled = txt2img(model, Settings(**{**S.to_dict(), "compile": True}), encoder)
    assert (compiled - eager).abs().max() < 2e-3  # same network; only kernel rounding differs
    assert g._network(model.unet, True) is g._network(model.unet, True)  # kept for the next image
    assert g._network(model.unet, False) is model.unet


def test_from_a_png_whose_model_is_gone_says_so_and_suggests_model(model_dir, tmp_path):
    import shutil

    moved = tmp_path / "moved-model"
    shutil.copytree(model_dir, moved)
    made = _cli("generate", "a red circle", "--model", str(moved), "--steps", "2", "--out", str(tmp_path / "a"))
    assert made.returncode == 0, made.stderr[-2000:]
    png = made.stdout.strip().splitlines()[-1]
    shutil.rmtree(moved)
    again = _cli("generate", "--from", png, "--out", str(tmp_path / "b"))
    assert again.returncode == 2
    assert "no longer exists" in again.stderr and "--model" in again.stderr and str(moved) in again.stderr
    ok = _cli("generate", "--from", png, "--model", str(model_dir), "--out", str(tmp_path / "b"))
    assert ok.returncode == 0, ok.stderr[-2000:]
