"""Super-resolution conditioning (Imagen, Saharia et al. 2022; cascaded diffusion, Ho et al. 2021).

A super-resolution stage is a diffusion model on pixels at the high resolution whose UNet also sees the
low-resolution image, bilinearly upsampled to its size and concatenated to its input channels, and the level
of Gaussian noise that image was augmented with (noise-conditioning augmentation), as a class label. Training
degrades each target image by the stage's factor (antialiased bicubic), upsamples it back, augments it at a
random level and teaches the network to denoise the target given it; at inference the low-resolution image
(a base model's output, or any picture) is augmented at one chosen level. The augmentation makes the stage
robust to the artefacts of the stage before it; the level trades faithfulness for invention.

Level s of N: the low-resolution image noised as the diffusion's forward process at timestep s - 1,
sqrt(abar) x + sqrt(1 - abar) eps, and level 0 untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def degrade(images: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H / scale, W / scale): the antialiased bicubic downsampling training uses to make
    a stage's low-resolution input."""
    h, w = images.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"a {h}x{w} image does not shrink evenly by {scale}")
    return F.interpolate(images, size=(h // scale, w // scale), mode="bicubic", antialias=True,
                         align_corners=False).clamp(-1, 1)


def upsample(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The low-resolution image at the stage's size: bilinear, as the stage's conditioning channels are."""
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False)


def augment(up: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor
            ) -> torch.Tensor:
    """Noise-conditioning augmentation: each row at its level (0: untouched; s: the forward process at
    timestep s - 1)."""
    levels = levels.to(torch.long)
    if (levels < 0).any() or (levels > len(alphas_cumprod)).any():
        raise ValueError(f"noise levels must lie in 0..{len(alphas_cumprod)}")
    ab = torch.where(levels > 0, alphas_cumprod.to(up.dtype)[(levels - 1).clamp(min=0)], torch.ones_like(
        levels, dtype=up.dtype)).reshape(-1, 1, 1, 1)
    return ab.sqrt() * up + (1 - ab).sqrt() * noise


def check_noise_level(level: int, levels: int) -> int:
    if not 0 <= level < levels:
        raise ValueError(f"noise level {level} is outside this stage's trained range 0..{levels - 1}")
    return level


class LowResConditioned:
    """The UNet of a super-resolution stage, called as any denoiser's network: (x, t, low_res=..., **cond),
    with the (augmented, upsampled) low-resolution rows concatenated to x's channels. Rows of ``low_res`` line
    up with x's (the pipeline passes them in cond, so guidance and the two-row floor duplicate them)."""

    def __init__(self, network):
        self.network = network

    def __call__(self, x: torch.Tensor, t, low_res: torch.Tensor | None = None, **cond) -> torch.Tensor:
        if low_res is None:
            raise ValueError("a super-resolution stage needs the low-resolution image (low_res)")
        if low_res.shape[0] != x.shape[0] or low_res.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"low-resolution rows {tuple(low_res.shape)} do not line up with {tuple(x.shape)}")
        return self.network(torch.cat([x, low_res.to(x.dtype)], dim=1), t, **cond)
