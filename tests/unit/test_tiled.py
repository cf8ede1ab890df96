"""Tiled denoising: exact where nothing crosses a tile, feathered where something does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imagine.pipelines.tiled import TiledDenoiser, tile_origins, tiled_decode


def test_tiles_cover_every_position_and_end_flush():
    assert tile_origins(64, 64, 16) == [0]
    assert tile_origins(100, 32, 8) == [0, 24, 48, 68]
    assert tile_origins(40, 32, 0) == [0, 8]
    for size, tile, overlap in ((100, 32, 8), (257, 64, 16), (33, 32, 31)):
        starts = tile_origins(size, tile, overlap)
        covered = torch.zeros(size)
        for s in starts:
            covered[s: s + tile] = 1
        assert covered.all() and starts[-1] + tile == size


def test_pointwise_denoisers_are_untouched_by_tiling_and_spatial_cond_is_cut_with_the_tile():
    """A denoiser that acts position by position gives the same result tiled: the blend weights sum to one
    everywhere, and the low-resolution rows are cut to each tile (per-row inputs pass whole)."""
    calls = []

    def denoiser(x, sigma, cond):
        calls.append(tuple(x.shape[-2:]))
        assert cond["low_res"].shape == x.shape and cond["class_labels"].shape == (2,)
        return x * 2 + cond["low_res"] * cond["class_labels"].reshape(-1, 1, 1, 1) + sigma

    x, low = torch.randn(2, 3, 50, 70), torch.randn(2, 3, 50, 70)
    cond = {"low_res": low, "class_labels": torch.tensor([1.0, 3.0])}
    whole = denoiser(x, 0.5, cond)
    tiled = TiledDenoiser(denoiser, 32, 8)(x, 0.5, cond)
    torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=1e-6)
    assert len(calls) == 1 + 2 * 3 and max(max(c) for c in calls[1:]) == 32
    small = torch.randn(2, 3, 20, 32)
    calls.clear()
    assert torch.equal(TiledDenoiser(denoiser, 32, 8)(small, 0.5, {**cond, "low_res": small}),
                       denoiser(small, 0.5, {**cond, "low_res": small}))
    assert calls == [(20, 32), (20, 32)]  # one call: no tiling when it fits


def test_overlap_feathers_the_seams_of_a_denoiser_that_looks_around():
    """A blur sees past a tile's edge; the feathered overlap keeps the tiled result near the whole one, much
    nearer than tiles that only touch, and leaves no step at the tile borders."""
    kernel = torch.full((3, 1, 5, 5), 1 / 25)

    def blur(x, sigma, cond):
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)

    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    whole = blur(x, 0.0, None)
    feathered = TiledDenoiser(blur, 40, 16)(x, 0.0, None)
    butted = TiledDenoiser(blur, 40, 0)(x, 0.0, None)
    err_f, err_b = (feathered - whole).abs(), (butted - whole).abs()
    assert err_f.max() < 0.5 * err_b.max() and err_f.mean() < 0.3 * err_b.mean()
    # no seam: the step between neighbouring columns is no larger at a tile border than in the whole image
    steps = (feathered[..., 1:] - feathered[..., :-1]).abs().amax(dim=(0, 1, 2))
    reference = (whole[..., 1:] - whole[..., :-1]).abs().amax(dim=(0, 1, 2))
    assert (steps <= reference.max() * 1.2).all()


def test_bad_tiles_are_refused():
    with pytest.raises(ValueError, match="at least 8"):
        TiledDenoiser(lambda *a: a[0], 4, 0)
    with pytest.raises(ValueError, match="overlap must lie in"):
        TiledDenoiser(lambda *a: a[0], 16, 16)
    from imagine.pipelines.generate import Settings

    with pytest.raises(ValueError, match="tile must be at least 32"):
        Settings(tile=16).validate()


def test_tiled_decoding_is_exact_where_nothing_crosses_a_tile():
    """VAE tiling: a decoder that maps each latent position to its own pixels (an upsampling by the latent
    factor and a pointwise map) decodes the same tiled as whole, whatever the tile; the feathered weights sum
    to one everywhere. A latent within one tile is decoded whole."""
    torch.manual_seed(0)
    weight = torch.randn(3, 4, 1, 1)

    def decode(z):
        return F.conv2d(F.interpolate(z, scale_factor=8, mode="nearest"), weight).tanh()

    z = torch.randn(2, 4, 37, 50)
    whole = decode(z)
    for tile in (8, 16, 24, 64):
        assert torch.allclose(tiled_decode(decode, z, tile, 8), whole, atol=1e-6)
    calls = []
    tiled_decode(lambda t: calls.append(t.shape) or decode(t), z, 64, 8)
    assert calls == [z.shape]


def test_tiled_decoding_feathers_a_decoder_that_looks_across_tiles():
    """A decoder with a 3x3 convolution sees across a tile's edge: tiled, its pixels differ only near the
    seams (a fifth of the pixels at most here), where the tiles' pixels are feathered into each other."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def decode(z):
        with torch.no_grad():
            return conv(F.interpolate(z, scale_factor=2, mode="nearest"))

    z = torch.randn(1, 4, 40, 40)
    whole, tiled = decode(z), tiled_decode(decode, z, 16, 2)
    differs = (whole - tiled).abs().amax(dim=(0, 1)) > 1e-5
    assert differs.any() and differs.float().mean() < 0.2
