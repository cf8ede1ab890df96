"""Sampling a class-conditional or unconditional model (pixel or latent): a short explicit loop.

Image i uses its own CPU generator seeded with seed + i, for its starting noise and every noise draw of
a stochastic sampler, so it is the same image whatever batch it is generated in and on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from imagine.io.model_folder import DiffusionModel
from imagine.pipelines.generate import describe, sample
from imagine.pipelines.output import Generated
from imagine.pipelines.settings import Settings


def _check_cfg(cfg: float) -> float:
    if not isinstance(cfg, (int, float)) or not math.isfinite(cfg):
        raise ValueError(f"guidance scale must be a finite number, got {cfg!r}")
    return float(cfg)


def class_index(model: DiffusionModel, label: int | str | None) -> int | None:
    names = model.spec.class_names
    if label is None:
        return None
    if not names:
        raise ValueError("this model has no classes; drop --class")
    if isinstance(label, str) and label in names:
        return names.index(label)
    try:
        index = int(label)
    except ValueError:
        index = -1
    if not 0 <= index < len(names):
        raise ValueError(f"class {label!r} unknown; this model's classes are: {', '.join(names)}")
    return index


def generate(
    model: DiffusionModel,
    seeds: list[int],
    *,
    steps: int = 25,
    sampler: str = "dpmpp_2m",
    schedule: str | None = None,
    class_label: int | None = None,
    cfg: float = 1.0,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """One image per seed, as (N, C, H, W) floats in [-1, 1].

    class_label: a class index (see ``class_index``) for class-conditional models; None draws each image's
    class at random from its seed. cfg: classifier-free guidance scale (1 = off; needs a model trained with
    label dropout, whose "null" class is the extra last embedding)."""
    cfg = _check_cfg(cfg)
    cond = uncond = None
    num_classes = model.unet.config.num_class_embeds
    if num_classes:
        n_real = len(model.spec.class_names)
        if class_label is None:
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
            labels = torch.tensor([int(torch.randint(n_real, (1,), generator=g)) for g in gens])
        else:
            labels = torch.full((len(seeds),), int(class_label))
        cond = {"class_labels": labels}
        if num_classes > n_real:  # trained with label dropout: the last embedding is the null class
            uncond = {"class_labels": torch.full((len(seeds),), num_classes - 1)}
        elif cfg != 1.0:
            raise ValueError("this model was trained without label dropout, so it has no unconditional "
                             "branch: use --cfg 1")
    elif cfg != 1.0:
        raise ValueError("classifier-free guidance needs a conditional model; this one is unconditional")
    return sample(model, list(seeds), steps=steps, sampler=sampler, schedule=schedule, cond=cond,
                  uncond=uncond, cfg_scale=cfg, callback=callback)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, rows: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H, cols*W, C) image, row-major, 2-pixel gaps."""
    n, h, w, c = images.shape
    cols = math.ceil(n / rows)
    out = np.full((rows * (h + 2) - 2, cols * (w + 2) - 2, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        out[r * (h + 2): r * (h + 2) + h, col * (w + 2): col * (w + 2) + w] = images[i]
    return out


def sample_images(model: DiffusionModel, seeds: list[int], steps: int | None = None, sampler: str | None = None,
                  class_label: int | str | None = None, cfg: float = 1.0) -> list:
    """What `imagine sample` writes: one described image (a request.Generated) per seed, at the model's
    default steps and sampler where None is given."""
    label = class_index(model, class_label)
    steps = steps or model.spec.default_steps
    sampler = sampler or model.spec.default_sampler
    images = to_uint8(generate(model, seeds, steps=steps, sampler=sampler, class_label=label, cfg=cfg))
    prompt = f"class {model.spec.class_names[label]}" if label is not None else ""
    out = []
    for s, pixels in zip(seeds, images, strict=True):
        settings = Settings(prompt=prompt, steps=steps, sampler=sampler, cfg_scale=cfg, seed=s)
        parameters, record = describe(model, settings, "sample", 0, None, {"class": label})
        stem = f"{s:06d}" + (f"_class{label}" if label is not None else "")
        out.append(Generated(pixels, s, parameters, record, stem))
    return out
