"""Outpainting (issue 37): the canvas grown by borders and the new border inpainted, through the library, the
CLI (imagine outpaint, --from) and the refusals; the servers' doors are in test_server.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from imagine.io.png import read_png_metadata
from imagine.pipelines.generate import Settings, describe, inpaint, outpaint_canvas
from imagine.pipelines.request import Request
from imagine.pipelines.unconditional import to_uint8
from tests.e2e.inprocess import imagine

S = Settings(prompt="a red circle", steps=3, cfg_scale=3.0, seed=3)


@pytest.fixture(scope="module")
def model(t2i_model):
    return t2i_model


@pytest.fixture(scope="module")
def encoder(t2i_encoder):
    return t2i_encoder


def _image(w=16, h=16) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_the_canvas_and_mask_grow_by_the_borders_and_the_seam_reaches_into_the_image():
    init = _image(20, 12)
    s = replace(S, outpaint_left=8, outpaint_down=4, mask_blur=1)
    canvas, mask = outpaint_canvas(init, None, s)
    assert canvas.size == mask.size == (28, 16)
    c, m = np.asarray(canvas), np.asarray(mask)
    np.testing.assert_array_equal(c[:12, 8:], np.asarray(init))  # the image's own pixels, in place
    assert (m[:, :8] == 255).all() and (m[12:] == 255).all()  # the new borders
    assert (m[:, 8:10] == 255).all() and (m[10:12] == 255).all()  # and 2 x blur into the image on those sides
    assert (m[:10, 10:] == 0).all()  # the rest kept: the right and top were not grown
    # the border starts from the colours beside it (A1111's fill), not black
    assert np.abs(c[:12, 7].astype(int) - c[:12, 8].astype(int)).mean() < 60 and c[:, :8].mean() > 40
    # a mask given marks more inside the image, in the image's own coordinates
    extra = Image.new("L", init.size, 0)
    extra.paste(255, (15, 0, 20, 3))
    _, mask = outpaint_canvas(init, extra, s)
    assert (np.asarray(mask)[0:3, 23:28] == 255).all() and (np.asarray(mask)[4:10, 12:20] == 0).all()


def test_outpainting_keeps_the_image_and_draws_the_border(model, encoder):
    init = _image()
    s = replace(S, outpaint_right=16, outpaint_up=8, mask_blur=1, inpaint_fill="fill", strength=1.0)
    out = to_uint8(inpaint(model, s, init, None, encoder))[0]
    assert out.shape == (24, 32, 3)
    keep = out[8 + 6:, :16 - 6]  # beyond the seam's reach (2 x blur, and the blur's own 3 sigma)
    np.testing.assert_array_equal(keep, np.asarray(init)[6:, :10])
    canvas, _ = outpaint_canvas(init, None, s)
    assert np.abs(out[:, 16:].astype(int) - np.asarray(canvas)[:, 16:].astype(int)).mean() > 2  # drawn, not the fill
    text, record = describe(model, s, "inpaint", 0, encoder)
    assert "Outpaint: up 8 right 16" in text and record["settings"]["outpaint_right"] == 16
    # the same seed gives the same pixels, alone or in a batch
    batch = to_uint8(inpaint(model, replace(s, n=2), init, None, encoder))
    np.testing.assert_array_equal(batch[0], out)


def test_outpainting_is_refused_where_it_cannot_be_done(model):
    init = _image()
    f = model.latent_factor
    assert f > 1
    with pytest.raises(ValueError, match=f"height is 17 px .* not a multiple of {f}.*add {f - 1} px .* --up/--down"):
        Request("inpaint", replace(S, outpaint_up=1), init_image=init).check(model)
    with pytest.raises(ValueError, match=r"needs a mask .* or outpainting borders"):
        Request("inpaint", S, init_image=init).check(model)
    with pytest.raises(ValueError, match="grow the canvas of an inpaint request"):
        Request("img2img", replace(S, outpaint_left=8), init_image=init).check(model)
    with pytest.raises(ValueError, match="outpaint left must be a whole number of pixels"):
        Request("inpaint", replace(S, outpaint_left=-8), init_image=init).check(model)


def test_imagine_outpaint_and_from_reproduce_it(tiny_t2i_dir, tmp_path):
    src = tmp_path / "in.png"
    _image().save(src)
    out = tmp_path / "out"
    run = imagine("outpaint", src, "a red circle", "--left", "8", "--down", "8", "--model", tiny_t2i_dir,
                  "--steps", "3", "--seed", "5", "--out", out)
    assert run.returncode == 0, run.stderr
    made = Image.open(run.stdout.split()[-1])
    assert made.size == (24, 24)
    parameters, record = read_png_metadata(run.stdout.split()[-1])
    assert "Outpaint: left 8 down 8" in parameters and "mask" not in record and record["kind"] == "inpaint"
    again = imagine("generate", "--from", run.stdout.split()[-1], "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(again.stdout.split()[-1])), np.asarray(made))
    none = imagine("outpaint", src, "a red circle", "--model", tiny_t2i_dir, "--out", out)
    assert none.returncode != 0 and "give at least one border" in none.stderr
