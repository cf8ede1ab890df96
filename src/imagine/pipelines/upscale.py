"""Making images larger: a super-resolution stage (Imagen's, diffusion/superres.py), a cascade of stages after
a base model, and plain resamplers (Lanczos and friends) as A1111's upscaler list has them.

An SR stage is a text-conditioned pixel diffusion model whose input also carries the low-resolution image,
upsampled and noise-augmented at a chosen level. Each image of a batch takes its sampling noise from its own
seed and its augmentation noise from the seed's own second stream, so image i is the same at any batch size.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from imagine.io.model_folder import DiffusionModel

# The augmentation noise of the image with seed s comes from the generator seeded s + AUG_SEED: a stream of
# its own, apart from the sampler's (seed s) and from the seeds of the images beside it.
AUG_SEED = 0x5EED_0A06
# Resamplers by A1111's names (/sdapi/v1/upscalers); "None" keeps the size.
RESAMPLERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST, "Bicubic": Image.BICUBIC,
              "Bilinear": Image.BILINEAR}


def is_sr_stage(model: DiffusionModel) -> bool:
    return getattr(model.spec, "upscale", 1) > 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    from imagine.pipelines.unconditional import to_uint8

    return [Image.fromarray(a.squeeze()) for a in to_uint8(images)]


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """RGB pictures of one size -> (N, 3, H, W) in [-1, 1]."""
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images of one batch must share a size, got {sorted(sizes)}")
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1 for im in images]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def resample(images: list[Image.Image], size: tuple[int, int], name: str = "Lanczos") -> list[Image.Image]:
    """Each picture resized to ``size`` (width, height) by a named resampler."""
    if name not in RESAMPLERS:
        raise ValueError(f"resampler {name!r} unknown; choose one of: {', '.join(RESAMPLERS)}")
    return [im.convert("RGB").resize(size, RESAMPLERS[name]) if im.size != size else im.convert("RGB")
            for im in images]


def sr_stage(model: DiffusionModel, images: torch.Tensor, s, text_encoder, noise_level: int | None = None,
             **kwargs) -> torch.Tensor:
    """One super-resolution stage: ``images`` (n, 3, h, w) in [-1, 1], image i with seed s.seed + i, made
    ``model.spec.upscale`` times larger under the settings ``s`` (prompt, steps, sampler, CFG). noise_level:
    the augmentation level (None: the stage's default)."""
    from imagine.diffusion.superres import augment, check_noise_level, upsample
    from imagine.pipelines.generate import _sample

    spec = model.spec
    if not is_sr_stage(model):
        raise ValueError(f"{model.name} is not a super-resolution stage (it has no upscale factor)")
    n, channels, h, w = images.shape
    if channels != spec.image_channels:
        raise ValueError(f"the stage takes {spec.image_channels}-channel images, got {channels}")
    if n != s.n:
        raise ValueError(f"{n} images for {s.n} seeds")
    level = spec.default_noise_level if noise_level is None else noise_level
    if spec.noise_levels:
        check_noise_level(level, spec.noise_levels)
    elif level:
        raise ValueError("this stage was trained without noise augmentation: its noise level is 0")
    size = (h * spec.upscale, w * spec.upscale)
    noise = torch.stack([torch.randn((channels, *size), generator=torch.Generator().manual_seed(s.seed + i + AUG_SEED))
                         for i in range(n)])
    levels = torch.full((n,), int(level), dtype=torch.long)
    rows = augment(upsample(images.float(), size), levels, noise, spec.alphas_cumprod().float())
    stage = replace(s, width=size[1], height=size[0]).validate()
    return _sample(model, stage, text_encoder, low_res=(rows, levels), **kwargs)


def stage_settings(model: DiffusionModel, s, steps: int | None = None, sampler: str | None = None,
                   cfg_scale: float | None = None):
    """The settings a stage runs with: the request's prompt, seed and count, the stage's own defaults (its
    diffusion.json) for steps, sampler and guidance unless given, and none of the base's size or image options."""
    from imagine.pipelines.generate import Settings

    base = Settings(prompt=s.prompt, negative_prompt=s.negative_prompt, seed=s.seed, n=s.n, precision=s.precision,
                    noise_seed_delta=s.noise_seed_delta)
    return base.with_model_defaults(model.spec, steps, sampler, cfg_scale)


def cascade(stages: list[DiffusionModel], images: torch.Tensor, s, text_encoder, target: int | None = None,
            noise_levels: list[int | None] | None = None, callback=None, cancel=None) -> torch.Tensor:
    """A base model's images through SR stages in order, the text going to every stage, until each side
    reaches ``target`` (None: through every stage). Returns (n, 3, H, W) in [-1, 1]."""
    levels = list(noise_levels or [None] * len(stages))
    if len(levels) != len(stages):
        raise ValueError(f"{len(levels)} noise levels for {len(stages)} stages")
    out = images
    for stage, level in zip(stages, levels, strict=True):
        if target is not None and max(out.shape[-2:]) >= target:
            break
        out = sr_stage(stage, out, stage_settings(stage, s), text_encoder, level, callback=callback, cancel=cancel)
    if target is not None and max(out.shape[-2:]) < target:
        raise ValueError(f"the stages reach {max(out.shape[-2:])} px, short of {target}: add a stage")
    return out
