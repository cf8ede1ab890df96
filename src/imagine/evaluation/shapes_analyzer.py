"""A deterministic analyzer for builtin:shapes-style images: what objects does a picture show?

Each pixel is explained as the background blended with one named colour: alpha = how much of the pixel
the colour covers (its projection on the colour - background line), picking the colour that explains the
pixel best. Pixels with alpha >= 0.5 form objects (connected components, so antialiased edges never
bridge neighbours); each object's colour is its pixels' majority colour, its area the sum of alpha (sub-
pixel accurate), and its shape follows from three measurements whose ranges on ground-truth renders do
not overlap (tests/unit/test_shapes_analyzer.py): solidity (area over the convex hull of its pixel
centres; below 1 only for the concave star), fill of its bounding box (a triangle's is ~0.5, a circle's
and a square's >= 0.63), and how much of the box's corners it covers (a square's, not a circle's).

This is the groundwork of ShapesEval (GenEval's categories for this world); it is proven against the
dataset's own labels before it judges a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from imagine.data.conditions import classify, solidity_of
from imagine.data.shapes import BACKGROUNDS, COLORS


@dataclass(frozen=True)
class Detected:
    shape: str
    color: str
    center: tuple[float, float]  # (x, y) in [0, 1], y down
    area: float  # pixels, soft
    fill: float
    solidity: float
    corners: float


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dist = ((np.array([palette[n] for n in names], dtype=float) - rgb.astype(float)) ** 2).sum(1)
    return names[int(dist.argmin())]


def background_rgb(image: np.ndarray) -> np.ndarray:
    img = image.astype(float)
    return np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)


def background_name(image: np.ndarray) -> str:
    return _nearest(background_rgb(image), BACKGROUNDS)


def coverage(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: alpha in [0, 1] and the index of the named colour that, blended with the background,
    explains it best. (H, W) each."""
    bg = background_rgb(image)
    pix = image.astype(float).reshape(-1, 1, 3) - bg  # (P, 1, 3)
    cols = np.array(list(COLORS.values()), dtype=float) - bg  # (K, 3)
    norm2 = np.maximum((cols**2).sum(1), 1e-9)  # (K,)
    alpha = np.clip((pix * cols).sum(-1) / norm2, 0, 1)  # (P, K)
    residual = ((pix - alpha[..., None] * cols) ** 2).sum(-1)  # (P, K)
    best = residual.argmin(1)
    h, w = image.shape[:2]
    return alpha[np.arange(len(best)), best].reshape(h, w), best.reshape(h, w)


def segments(labels: np.ndarray, best: np.ndarray):
    """Each connected object of a labelled map as (its pixels' mask, the index of its majority colour)."""
    for k in range(1, int(labels.max()) + 1):
        core = labels == k
        yield core, int(np.bincount(best[core], minlength=len(COLORS)).argmax())


def analyze(image: np.ndarray, min_area: float = 10.0) -> list[Detected]:
    """Objects in an (H, W, 3) uint8 image, largest first."""
    h, w = image.shape[:2]
    alpha, best = coverage(image)
    labels = ndimage.label(alpha >= 0.5)[0]
    names = list(COLORS)
    found = []
    for core, color_index in segments(labels, best):
        # the soft area: this object's pixels plus the antialiased ring around it, in its colour
        ring = ndimage.binary_dilation(core) & (labels == 0) & (best == color_index)
        area = float(alpha[core].sum() + alpha[ring].sum())
        if area < min_area:
            continue
        near = ndimage.binary_dilation(core) & (best == color_index)
        ys, xs = np.nonzero(near & (alpha >= 0.2))  # the box of everything the object visibly covers
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        fill = area / ((x1 - x0 + 1) * (y1 - y0 + 1))
        corners = float(np.mean([alpha[y, x] * (best[y, x] == color_index)
                                 for y in (y0, y0 + 1, y1 - 1, y1) for x in (x0, x0 + 1, x1 - 1, x1)]))
        solidity = solidity_of(core)
        cy, cx = np.nonzero(core)
        weights = alpha[core]
        center = (float((cx * weights).sum() / weights.sum() + 0.5) / w,
                  float((cy * weights).sum() / weights.sum() + 0.5) / h)
        found.append(Detected(classify(solidity, fill, corners), names[color_index], center, area, fill, solidity,
                              corners))
    return sorted(found, key=lambda d: -d.area)
