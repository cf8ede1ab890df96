"""Editing by inversion (issue 37) through the library, the CLI and the job API on a tiny trained model:
null-text inversion brings the image back closer under guidance than plain DDIM inversion, DiffEdit's mask keeps
every pixel outside it, an inversion file is read back only for the edit it fits, and --from redoes an edit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.io.png import read_png_metadata
from imagine.pipelines import generate as g
from imagine.pipelines.inversion import MASK_BLUR, edit, edit_mask, invert
from imagine.pipelines.request import Request
from tests.e2e.inprocess import imagine

S = g.Settings(prompt="a blue square", source_prompt="a red circle", steps=6, cfg_scale=3.0, strength=1.0, seed=1)


@pytest.fixture(scope="module")
def model(t2i_model):
    return t2i_model


@pytest.fixture(scope="module")
def encoder(t2i_encoder):
    return t2i_encoder


def _image() -> Image.Image:
    px = np.zeros((16, 16, 3), np.uint8)
    px[4:12, 3:9] = (220, 30, 30)
    return Image.fromarray(px)


def test_null_text_brings_the_image_back_closer_under_guidance(model, encoder):
    plain = replace(S, prompt=S.source_prompt, edit_mask=False)
    z0 = g._init_latent(model, replace(plain, width=16, height=16), _image(), (16, 16))

    def error(s):
        inv = invert(model, s, _image(), encoder)
        assert len(inv.latents) == s.steps + 1 and torch.equal(inv.latents[0], z0)
        assert (inv.null is None) == (not s.null_text) and (inv.null is None or len(inv.null) == s.steps)
        back = edit(model, s, _image(), encoder, inversion=inv)
        return (back - g.decode(model, z0).clamp(-1, 1)).pow(2).mean().item()  # against the VAE's own round trip

    assert error(replace(plain, null_text=True)) < 0.8 * error(plain)


def test_the_edit_mask_keeps_every_pixel_outside_it(model, encoder):
    mask = edit_mask(model, S, _image(), encoder)
    assert mask.shape[-2:] == (16 // model.latent_factor,) * 2 and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 < mask.sum() < mask.numel(), "the two prompts' predictions differ everywhere or nowhere"
    out = edit(model, S, _image(), encoder)
    up = torch.nn.functional.interpolate(mask, size=(16, 16), mode="nearest")[0, 0].bool()
    far = ~torch.nn.functional.max_pool2d(up[None, None].float(), 2 * 3 * MASK_BLUR + 1, 1, 3 * MASK_BLUR)[0, 0].bool()
    original = g._image_tensor(_image(), (16, 16), 3)
    if far.any():
        assert torch.equal(out[0][:, far], original[0][:, far])
    without = edit(model, replace(S, edit_mask=False), _image(), encoder)
    assert not torch.equal(without, out)


def test_edits_are_refused_where_they_cannot_be_done(model):
    with pytest.raises(ValueError, match="deterministic: ask for n = 1"):
        Request("edit", replace(S, n=2), init_image=_image()).check(model)
    with pytest.raises(ValueError, match="edit needs an init image"):
        Request("edit", S).check(model)
    checked = Request("edit", replace(S, sampler="euler_a"), init_image=_image()).check(model)
    assert checked.settings.sampler == "ddim"  # an edit walks DDIM, whatever was asked


def test_invert_edit_and_from_through_the_cli(tiny_t2i_dir, tmp_path):
    src = tmp_path / "in.png"
    _image().save(src)
    run = imagine("invert", src, "--prompt", "a red circle", "--model", tiny_t2i_dir, "--steps", 4, "--null-text",
                  "--save", tmp_path / "inv.safetensors", "--out", tmp_path / "o")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "reconstruction PSNR:" in run.stderr and (tmp_path / "inv.safetensors").is_file()
    text, record = read_png_metadata(run.stdout.split()[-1])
    assert record["kind"] == "edit" and "Inversion: null-text" in text and "Edit mask: off" in text
    common = ["--from-prompt", "a red circle", "--to-prompt", "a blue square", "--model", tiny_t2i_dir, "--steps", 4,
              "--null-text", "--out", tmp_path / "e"]
    fresh = imagine("edit", src, *common)
    reused = imagine("edit", src, *common, "--inversion", tmp_path / "inv.safetensors")
    assert fresh.returncode == 0 and reused.returncode == 0, fresh.stderr[-2000:] + reused.stderr[-2000:]
    a, b = (np.asarray(Image.open(r.stdout.split()[-1])) for r in (fresh, reused))
    assert np.array_equal(a, b), "the saved inversion is the one the edit makes"
    text, record = read_png_metadata(fresh.stdout.split()[-1])
    assert "Source prompt: a red circle" in text and "Edit mask: DiffEdit" in text
    assert record["settings"]["source_prompt"] == "a red circle" and record["init_image"]["sha256_10"]
    again = imagine("generate", "--from", fresh.stdout.split()[-1], "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(again.stdout.split()[-1])), a)
    other = imagine("edit", src, *common[:-2], "--strength", "0.5", "--inversion", tmp_path / "inv.safetensors",
                    "--out", tmp_path / "e")
    assert other.returncode != 0 and "inverted with other settings: strength" in other.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    broken = imagine("edit", src, *common[:-2], "--inversion", bad, "--out", tmp_path / "e")
    assert broken.returncode != 0 and "is not an inversion file" in broken.stderr
