"""The frozen image encoders an IP-Adapter reads: image -> embedding (B, dim).

- ``shapes-clip``: the image tower of the shipped CLIP-style scorer (or any ``imagine train-clip`` folder),
  its unit embedding: the default for the shipped model.
- a transformers ``CLIPVisionModelWithProjection`` folder (the ``image_encoder/`` beside real IP-Adapter
  files): its projected ``image_embeds``, after CLIP's own preprocessing (resize, centre crop, normalise).
- ``palette``: Composer's colour palette (Huang et al. 2023, section 3.1): a smoothed CIELab histogram,
  11 hues x 5 chromas x 5 lightnesses, each pixel spread over the bins by a Gaussian of sigma 10 Lab units.
- ``intensity``: Composer's intensity, as a global condition: the luminance at 8 x 8 (in [-1, 1]) and its
  mean and spread.

Every encoder has ``name`` (what an adapter records), ``dim`` and ``embed(images in [-1, 1]) -> (B, dim)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imagine.models.text_encoders import TRANSFORMERS_LOCK

BUILTIN = ("shapes-clip", "palette", "intensity")

# Composer's palette bins
HUES, CHROMAS, LIGHTS, SIGMA = 11, 5, 5, 10.0


def _bin_centres() -> np.ndarray:
    """(HUES * CHROMAS * LIGHTS, 3) Lab centres: lightness 10..90, chroma 0..~100, hues around the circle."""
    out = []
    for li in range(LIGHTS):
        lightness = 10 + 80 * li / (LIGHTS - 1)
        for ci in range(CHROMAS):
            chroma = 100 * ci / (CHROMAS - 1)
            for hi in range(HUES):
                hue = 2 * math.pi * hi / HUES
                out.append((lightness, chroma * math.cos(hue), chroma * math.sin(hue)))
    return np.asarray(out, dtype=np.float32)


_CENTRES = _bin_centres()


def palette(images: torch.Tensor, pixels: int = 32) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 275) smoothed CIELab histograms, each summing to 1. The image is
    first reduced to ``pixels`` on a side (area average): the palette is global, and this keeps it cheap."""
    from skimage.color import rgb2lab

    small = F.interpolate(images.float().clamp(-1, 1), size=(pixels, pixels), mode="area")
    rgb = ((small + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in rgb:
        lab = rgb2lab(img).reshape(-1, 3).astype(np.float32)
        d2 = ((lab[:, None, :] - _CENTRES[None]) ** 2).sum(-1)  # (pixels, bins)
        weights = np.exp(-(d2 - d2.min(1, keepdims=True)) / (2 * SIGMA**2))
        weights /= weights.sum(1, keepdims=True)
        out.append(weights.mean(0))
    return torch.from_numpy(np.stack(out)).to(images.device)


def palette_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - histogram intersection of two palettes: 0 the same colours in the same shares, 1 disjoint."""
    return 1 - torch.minimum(a, b).sum(-1)


def intensity(images: torch.Tensor, grid: int = 8) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, grid * grid + 2): the luminance at grid x grid, then its mean and std."""
    rgb = images.float().clamp(-1, 1)
    luma = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None] if rgb.shape[1] == 3 else rgb[:, :1]
    small = F.interpolate(luma, size=(grid, grid), mode="area").flatten(1)
    return torch.cat([small, luma.mean((1, 2, 3))[:, None], luma.std((1, 2, 3))[:, None]], dim=1)


class FunctionEncoder:
    """A fixed function of the pixels (palette, intensity): nothing to load, nothing to train."""

    def __init__(self, name: str):
        self.name = name
        self.fn = {"palette": palette, "intensity": intensity}[name]
        self.dim = int(self.fn(torch.zeros(1, 3, 8, 8)).shape[1])

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images).float()


class ShapesTowerEncoder:
    """A ShapesCLIP's image tower: its unit image embedding."""

    def __init__(self, model, name: str):
        self.model, self.name = model.requires_grad_(False), name  # a ShapesCLIP; "shapes-clip" or its folder
        self.dim = model.config.embed_dim

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.float())


# OpenAI CLIP's normalisation, what CLIPImageProcessor defaults to
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class CLIPVisionEncoder:
    """A transformers CLIPVisionModelWithProjection folder, preprocessed as its preprocessor_config.json says
    (shortest side resized to the crop size, bicubic; centre crop; CLIP's mean and std)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with TRANSFORMERS_LOCK:
                from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

                config = CLIPVisionConfig.from_pretrained(str(self.path))
                self.model = CLIPVisionModelWithProjection.from_pretrained(str(self.path), use_safetensors=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load a CLIP vision encoder from {self.path}: {err}") from None
        self.model.eval().requires_grad_(False)
        pre = {}
        if (self.path / "preprocessor_config.json").is_file():
            pre = json.loads((self.path / "preprocessor_config.json").read_text())
        crop = pre.get("crop_size", config.image_size)
        self.size = int(crop.get("height", config.image_size) if isinstance(crop, dict) else crop)
        self.mean = torch.tensor(pre.get("image_mean", CLIP_MEAN)).reshape(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", CLIP_STD)).reshape(1, 3, 1, 1)
        self.name = str(self.path)
        self.dim = config.projection_dim

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                          mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top: top + self.size, left: left + self.size]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self.preprocess(images)).image_embeds.float()
