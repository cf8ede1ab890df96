"""Guidance as denoiser wrappers, not sampler flags: each wraps D(x, sigma, cond) and is one itself.

- ClassifierFreeGuidance: Ho & Salimans 2022, D = D_u + s (D_c - D_u), conditional and unconditional
  (or negative-prompt) branches in one batched call; optional guidance rescale (Lin et al. 2023,
  section 3.4), which pulls the guided prediction's standard deviation back toward the conditional one.
- DynamicThresholding: Imagen (Saharia et al. 2022, section 2.3), per-sample percentile clipping of x0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from imagine.diffusion.denoiser import Cond, DenoiserFn, append_dims, broadcast_sigma


def _check_finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _cat_cond(uncond: Cond, cond: Cond) -> dict[str, Any]:
    """Stack two conditioning dicts along the batch (unconditional first). Tensors are concatenated;
    other values must agree."""
    uncond, cond = dict(uncond or {}), dict(cond or {})
    if uncond.keys() != cond.keys():
        raise ValueError(f"conditional and unconditional inputs differ in keys: {sorted(cond)} vs {sorted(uncond)}")
    out: dict[str, Any] = {}
    for key, value in cond.items():
        other = uncond[key]
        if isinstance(value, torch.Tensor):
            if other.shape[1:] != value.shape[1:]:
                raise ValueError(f"{key}: unconditional shape {tuple(other.shape)} does not match {tuple(value.shape)}")
            out[key] = torch.cat([other, value])
        elif other != value:
            raise ValueError(f"{key}: conditional and unconditional values differ ({value!r} vs {other!r})")
        else:
            out[key] = value
    return out


class ClassifierFreeGuidance:
    """Wraps ``denoiser`` so that calling it with ``cond`` returns the guided x0.

    uncond: the unconditional (empty prompt, dropped label) or negative-prompt conditioning, each tensor
        with the same batch size as ``cond`` at call time.
    scale: the guidance scale s; 1 is the conditional model alone (one branch, no extra cost), 0 the
        unconditional one.
    rescale: phi in [0, 1], guidance rescale (Lin et al. 2023, eq. 15-16), applied to the noise
        prediction as diffusers does.
    """

    def __init__(self, denoiser: DenoiserFn, uncond: Cond, scale: float, rescale: float = 0.0):
        self.denoiser = denoiser
        self.uncond = uncond
        self.scale = _check_finite("guidance scale", scale)
        self.rescale = _check_finite("guidance rescale", rescale)
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"guidance rescale must lie in [0, 1], got {rescale}")

    def _both(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, fn):
        sigma = broadcast_sigma(sigma, x)
        out = fn(torch.cat([x, x]), torch.cat([sigma, sigma]), _cat_cond(self.uncond, cond))
        return out

    def _combine(self, x: torch.Tensor, sigma: torch.Tensor, x0_u: torch.Tensor, x0_c: torch.Tensor) -> torch.Tensor:
        x0 = x0_u + self.scale * (x0_c - x0_u)
        if self.rescale > 0:
            s = append_dims(broadcast_sigma(sigma, x), x.ndim).clamp(min=1e-8)
            eps_c, eps = (x - x0_c) / s, (x - x0) / s
            dims = list(range(1, x.ndim))
            factor = eps_c.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True).clamp(min=1e-12)
            eps = self.rescale * (eps * factor) + (1 - self.rescale) * eps
            x0 = x - s * eps
        return x0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, cond)
        x0_u, x0_c = self._both(x, sigma, cond, self.denoiser).chunk(2)
        return self._combine(x, sigma, x0_u, x0_c)

    def denoise_with_variance(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None):
        """Guided x0 with the conditional branch's learned variance (GLIDE's choice)."""
        x0, var = self._both(x, sigma, cond, self.denoiser.denoise_with_variance)  # type: ignore[attr-defined]
        x0_u, x0_c = x0.chunk(2)
        return self._combine(x, sigma, x0_u, x0_c), var.chunk(2)[1]


class DynamicThresholding:
    """Imagen's dynamic thresholding on the x0 prediction: s = the ``percentile`` quantile of |x0| per
    sample, and where s > 1, x0 <- clip(x0, -s, s) / s. Meant for pixel-space models at high guidance."""

    def __init__(self, denoiser: DenoiserFn, percentile: float = 0.995, max_value: float | None = None):
        self.denoiser = denoiser
        self.percentile = _check_finite("percentile", percentile)
        if not 0.0 < self.percentile <= 1.0:
            raise ValueError(f"percentile must lie in (0, 1], got {percentile}")
        self.max_value = max_value

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any] | None = None) -> torch.Tensor:
        x0 = self.denoiser(x, sigma, cond)
        s = torch.quantile(x0.flatten(1).abs().float(), self.percentile, dim=1).to(x0.dtype)
        s = s.clamp(min=1.0)
        if self.max_value is not None:
            s = s.clamp(max=self.max_value)
        s = append_dims(s, x0.ndim)
        return x0.clamp(-s, s) / s


class ImageTextGuidance:
    """InstructPix2Pix's guidance (Brooks et al. 2023, eq. 3) on three branches in one call: c (the prompt with
    the image), i (the negative prompt with the image) and u (the negative prompt without it: zero image
    latents); x0 = u + scale (c - i) + image_scale (i - u), A1111's CFG scale and Image CFG scale."""

    def __init__(self, denoiser: DenoiserFn, image_cond: Cond, uncond: Cond, scale: float, image_scale: float):
        self.denoiser, self.image_cond, self.uncond = denoiser, image_cond, uncond
        self.scale = _check_finite("guidance scale", scale)
        self.image_scale = _check_finite("image guidance scale", image_scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        sigma = broadcast_sigma(sigma, x)
        both = _cat_cond(cond, self.image_cond)  # (c, i): _cat_cond puts its first argument first
        out = self.denoiser(torch.cat([x, x, x]), torch.cat([sigma, sigma, sigma]), _cat_cond(both, self.uncond))
        c, i, u = out.chunk(3)
        return u + self.scale * (c - i) + self.image_scale * (i - u)
