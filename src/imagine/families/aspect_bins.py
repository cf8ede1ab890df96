"""The aspect-ratio buckets PixArt trained at (Chen et al. 2023, its multi-aspect training; diffusers'
``use_resolution_binning``): a request's size is mapped to the bucket whose ratio is closest, generated there,
then resized to cover the size asked and centre-cropped. The buckets are (height, width) in sixteenths of the
base side (64 px at 1024), the same shapes at 256, 512 and 1024 px; the 2K model's list adds five extreme
ones. Each bucket is named by its height / width rounded to two places, and the closest name wins (the first in
this order on a tie), as the reference does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TALL = ((8, 32), (8, 29), (9, 28), (9, 27), (9, 26), (10, 25), (10, 24), (11, 23), (11, 22), (11, 21), (12, 21),
         (12, 20), (13, 19), (13, 18), (14, 18), (14, 17), (15, 17), (15, 16))
_WIDE = ((16, 15), (17, 15), (17, 14), (18, 14), (18, 13), (19, 13), (20, 12), (21, 12), (22, 11), (23, 11),
         (24, 10), (25, 10), (27, 9), (32, 8))
BUCKETS = (*_TALL, (16, 16), *_WIDE)
BUCKETS_2K = (*_TALL[:1], (8, 31), (8, 30), *_TALL[1:], (16, 16), *_WIDE[:-2], (26, 9), (27, 9), (28, 9), (29, 8),
              (30, 8), (31, 8), (32, 8))
BASES = (256, 512, 1024, 2048)


def binned_size(base: int, width: int, height: int) -> tuple[int, int] | None:
    """(width, height) of the bucket closest in aspect ratio to ``width`` x ``height`` for a model trained at
    ``base`` px; None where the model has no buckets (another base size)."""
    if base not in BASES:
        return None
    unit = base // 16
    ratio = height / width
    h, w = min(BUCKETS_2K if base == 2048 else BUCKETS, key=lambda hw: abs(round(hw[0] / hw[1], 2) - ratio))
    return w * unit, h * unit


def resize_and_crop(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(N, C, H, W) images scaled (bilinear) to cover ``width`` x ``height``, then centre-cropped to it."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    scale = max(height / h, width / w)
    rh, rw = int(h * scale), int(w * scale)
    images = F.interpolate(images, size=(rh, rw), mode="bilinear", align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    return images[..., top: top + height, left: left + width]
