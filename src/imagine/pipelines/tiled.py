"""Tiled denoising (MultiDiffusion, Bar-Tal et al. 2023): a denoiser evaluated on overlapping tiles of the
sample, each tile's estimate feathered into its neighbours', so images whose activations would not fit in
memory still sample, and no seam shows. Spatial conditioning (a super-resolution stage's low-resolution rows)
is cut to the same tiles; everything else in cond is per row and passes through.

The tiles of one step all see the same sigma; the weights of every position sum to one, so a sample that fits
in one tile is evaluated exactly as without tiling. Memory is bounded by one tile's activations.
"""

from __future__ import annotations

import torch


def tile_origins(size: int, tile: int, overlap: int) -> list[int]:
    """Start positions along one axis: every (tile - overlap), the last tile flush with the far edge."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    return [*range(0, size - tile, stride), size - tile]


def _ramp(length: int, overlap: int, low: bool, high: bool) -> torch.Tensor:
    """Weights along one axis of a tile: rising over ``overlap`` from a side with a neighbour (low: the start,
    high: the end), flat at 1 elsewhere and at the image's own edges."""
    w = torch.ones(length)
    if overlap > 0:
        rise = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        if low:
            w[:overlap] = torch.minimum(w[:overlap], rise)
        if high:
            w[-overlap:] = torch.minimum(w[-overlap:], rise.flip(0))
    return w


class TiledDenoiser:
    """``denoiser(x, sigma, cond)`` evaluated tile by tile when x is larger than ``tile`` on a side (in the
    sampling space's positions: latent or pixel), tiles overlapping by ``overlap``."""

    def __init__(self, denoiser, tile: int, overlap: int):
        if tile < 8:
            raise ValueError(f"tiles must be at least 8 positions a side, got {tile}")
        if not 0 <= overlap < tile:
            raise ValueError(f"the tile overlap must lie in [0, {tile}), got {overlap}")
        self.denoiser, self.tile, self.overlap = denoiser, tile, overlap

    def __call__(self, x: torch.Tensor, sigma, cond=None):
        h, w = x.shape[-2:]
        if h <= self.tile and w <= self.tile:
            return self.denoiser(x, sigma, cond)
        out = torch.zeros_like(x)
        total = torch.zeros((h, w), dtype=x.dtype)
        ys, xs = tile_origins(h, self.tile, self.overlap), tile_origins(w, self.tile, self.overlap)
        for top in ys:
            for left in xs:
                th, tw = min(self.tile, h), min(self.tile, w)
                window = (slice(top, top + th), slice(left, left + tw))
                part = {k: self._crop(v, (h, w), window) for k, v in (cond or {}).items()} if cond else cond
                estimate = self.denoiser(x[..., window[0], window[1]], sigma, part)
                weight = torch.outer(_ramp(th, self.overlap, top > 0, top + th < h),
                                     _ramp(tw, self.overlap, left > 0, left + tw < w)).to(x.dtype)
                out[..., window[0], window[1]] += estimate * weight
                total[window[0], window[1]] += weight
        return out / total

    @staticmethod
    def _crop(value, size: tuple[int, int], window):
        if isinstance(value, torch.Tensor) and value.ndim == 4 and tuple(value.shape[-2:]) == size:
            return value[..., window[0], window[1]]
        return value

    def denoise_with_variance(self, x, sigma, cond=None):
        raise ValueError("tiled sampling does not cover DDPM with a learned variance; use another sampler or "
                         "no tiles")


def tiled_decode(decode, z: torch.Tensor, tile: int, factor: int) -> torch.Tensor:
    """A VAE's ``decode`` over overlapping latent tiles of ``tile`` positions a side (a quarter overlapping),
    each tile's pixels feathered into its neighbours' (the ramps above), so the decoder's activations are one
    tile's whatever the image's size (diffusers' enable_vae_tiling and A1111's Tiled VAE do the same). The
    decoder's group norms and middle attention see one tile at a time, so the pixels differ slightly from a
    whole decode; an image that fits in one tile is decoded exactly as without tiling."""
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return decode(z)
    overlap = tile // 4
    out = total = None
    for top in tile_origins(h, tile, overlap):
        for left in tile_origins(w, tile, overlap):
            th, tw = min(tile, h), min(tile, w)
            pixels = decode(z[..., top: top + th, left: left + tw]).float()
            if out is None:
                out = torch.zeros((*pixels.shape[:2], h * factor, w * factor), dtype=torch.float32,
                                  device=pixels.device)
                total = torch.zeros((h * factor, w * factor), dtype=torch.float32, device=pixels.device)
            weight = torch.outer(_ramp(th * factor, overlap * factor, top > 0, top + th < h),
                                 _ramp(tw * factor, overlap * factor, left > 0, left + tw < w)).to(pixels.device)
            out[..., top * factor: (top + th) * factor, left * factor: (left + tw) * factor] += pixels * weight
            total[top * factor: (top + th) * factor, left * factor: (left + tw) * factor] += weight
    return out / total
