"""A1111's img2img and inpaint options, honoured: resize modes, masked content, inpaint only masked, mask
invert, clip skip and the eta noise seed delta; each on inputs with a known answer, recorded in the PNG."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.data.transforms import fit_image
from imagine.io.model_folder import load_model_folder
from imagine.models.text_encoders import default_text_encoder
from imagine.pipelines.generate import Settings, describe, fill_masked, inpaint, mask_box, txt2img
from imagine.pipelines.unconditional import to_uint8

S = Settings(prompt="a red circle", steps=3, cfg_scale=3.0, seed=3)


@pytest.fixture(scope="module")
def model(tiny_t2i_dir):
    return load_model_folder(tiny_t2i_dir)


@pytest.fixture(scope="module")
def encoder():
    return default_text_encoder()


def _bars() -> Image.Image:
    """40x20: left half red, right half blue, a green column at each edge."""
    px = np.zeros((20, 40, 3), dtype=np.uint8)
    px[:, :20] = (255, 0, 0)
    px[:, 20:] = (0, 0, 255)
    px[:, 0] = px[:, -1] = (0, 255, 0)
    return Image.fromarray(px)


def test_resize_modes_on_a_known_image():
    img = _bars()
    stretched = np.asarray(fit_image(img, (20, 20), "just_resize"))
    assert stretched.shape == (20, 20, 3) and stretched[10, 2, 0] > 200 and stretched[10, 17, 2] > 200
    cropped = np.asarray(fit_image(img, (20, 20), "crop_and_resize"))  # the centre 20x20: red | blue, no green
    assert cropped[:, :10, 0].min() > 200 and cropped[:, 10:, 2].min() > 200 and cropped[:, :, 1].max() < 60
    filled = np.asarray(fit_image(img, (40, 40), "resize_and_fill"))  # fits 40x20 in the middle, rows stretched
    assert filled.shape == (40, 40, 3)
    np.testing.assert_array_equal(filled[0], filled[10])  # the border repeats the first row
    np.testing.assert_array_equal(filled[39], filled[29])
    assert filled[20, 10, 0] > 200 and filled[20, 30, 2] > 200
    assert np.asarray(fit_image(img, (40, 20), "crop_and_resize")).tobytes() == img.tobytes()  # same size: as is


def test_fill_paints_the_hole_with_the_colours_around_it():
    image = torch.zeros(1, 3, 16, 16)
    image[:, 0] = 0.8  # red everywhere...
    image[:, :, 6:10, 6:10] = -1  # ...but a black hole, which the mask covers
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 6:10, 6:10] = 1
    out = fill_masked(image, mask)
    torch.testing.assert_close(out[..., 6:10, 6:10], image[..., :4, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(out * (1 - mask), image * (1 - mask))  # kept pixels untouched


def test_mask_box_pads_and_matches_the_aspect():
    mask = Image.new("L", (100, 60))
    mask.paste(255, (40, 20, 50, 30))
    assert mask_box(mask, 0, 1.0) == (40, 20, 50, 30)
    l, t, r, b = mask_box(mask, 5, 2.0)  # 20x20 with padding, widened to 2:1
    assert (r - l, b - t) == (40, 20) and l <= 35 and r >= 55
    with pytest.raises(ValueError, match="mask is empty"):
        mask_box(Image.new("L", (8, 8)), 4, 1.0)


def _scene():
    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    mask = Image.new("L", (48, 32))
    mask.paste(255, (20, 10, 28, 18))
    return init, mask


def test_inpaint_only_masked_changes_only_the_padded_box_and_keeps_the_image_size(model, encoder):
    init, mask = _scene()
    s = replace(S, width=16, height=16, strength=1.0, mask_blur=0, inpaint_only_masked=True, inpaint_padding=2)
    out = to_uint8(inpaint(model, s, init, mask, encoder))[0]
    assert out.shape == (32, 48, 3)  # the init image's size, not the 16x16 it was worked at
    original = np.asarray(init)
    outside = np.ones((32, 48), bool)
    outside[10:18, 20:28] = False
    np.testing.assert_array_equal(out[outside], original[outside])  # with no blur, exactly the original
    assert np.abs(out[10:18, 20:28].astype(int) - original[10:18, 20:28]).mean() > 10


def test_mask_invert_and_masked_content_change_what_is_regenerated(model, encoder):
    init, mask = _scene()
    base = replace(S, width=48, height=32, strength=0.5, mask_blur=0)
    normal = to_uint8(inpaint(model, base, init, mask, encoder))[0]
    inverted = to_uint8(inpaint(model, replace(base, mask_invert=True), init, mask, encoder))[0]
    original = np.asarray(init)
    np.testing.assert_array_equal(inverted[10:18, 20:28], original[10:18, 20:28])  # the mask's inside is kept now
    np.testing.assert_array_equal(normal[:5], original[:5])
    outs = {fill: to_uint8(inpaint(model, replace(base, inpaint_fill=fill), init, mask, encoder))[0]
            for fill in ("fill", "original", "latent_noise", "latent_nothing")}
    assert len({o.tobytes() for o in outs.values()}) == 4  # each starts the region from something else
    with pytest.raises(ValueError, match="inpaint fill 'blur' unknown"):
        inpaint(model, replace(base, inpaint_fill="blur"), init, mask, encoder)


def test_clip_skip_and_noise_seed_delta_are_honoured_and_recorded(model, encoder):
    a = to_uint8(txt2img(model, S, encoder))
    assert np.array_equal(a, to_uint8(txt2img(model, replace(S, clip_skip=1), encoder)))  # 1 is the last layer
    assert not np.array_equal(a, to_uint8(txt2img(model, replace(S, clip_skip=2), encoder)))
    with pytest.raises(ValueError, match="clip skip 9 is out of range"):
        txt2img(model, replace(S, clip_skip=9), encoder)  # MiniLM has 6 layers
    # ENSD moves a stochastic sampler's noise, never a deterministic one's
    anc = replace(S, sampler="Euler a")
    assert np.array_equal(a, to_uint8(txt2img(model, replace(S, noise_seed_delta=31337), encoder)))
    assert not np.array_equal(to_uint8(txt2img(model, anc, encoder)),
                              to_uint8(txt2img(model, replace(anc, noise_seed_delta=31337), encoder)))
    text, record = describe(model, replace(anc, clip_skip=2, noise_seed_delta=31337), "txt2img", 0, encoder)
    assert "Clip skip: 2" in text and "ENSD: 31337" in text
    assert record["settings"]["clip_skip"] == 2 and record["settings"]["noise_seed_delta"] == 31337


def test_inpaint_options_are_recorded_as_a1111_writes_them(model, encoder):
    s = replace(S, inpaint_only_masked=True, inpaint_padding=8, inpaint_fill="latent_noise", mask_invert=True,
                resize_mode="crop_and_resize")
    text, _ = describe(model, s, "inpaint", 0, encoder)
    for field in ("Masked content: latent noise", "Inpaint area: Only masked", "Masked area padding: 8",
                  "Mask mode: Inpaint not masked", "Resize mode: Crop and resize"):
        assert field in text
