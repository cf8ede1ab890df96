"""Preprocessors: an image in, the spatial condition a ControlNet or T2I-Adapter reads out (A1111's modules).

Each takes an (H, W, 3) uint8 RGB array and returns an (H, W, 3) uint8 condition map:

- canny: Canny edges (scikit-image), white on black, found in each colour channel and joined, so edges
  between colours of equal brightness are not lost; thresholds on A1111's 0-255 gradient scale.
- scribble: the outlines of the image's regions drawn as thick white strokes, as a hand scribble would be.
- segmentation: a colour-label map: the background black, every object region filled with the colour of
  its shape class (SEGMENT_COLORS), as ADE20K maps colour by class.
- keypoints: each object's centre as a white disc whose radius is a third of the object's (the stand-in
  for a pose skeleton in the shapes world: where things are and how big).
- tile: the image down-sampled by a factor and up-sampled again (A1111's tile_resample): layout and colour
  without detail, for Tile ControlNet repair and upscaling.
- none: the image as it is (a condition made beforehand, e.g. by ``imagine detect``).

Regions are found against the background (the median colour of the border) by colour distance, then split
into connected components; shape classes use the ShapesEval analyzer's measurements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

SEGMENT_COLORS = {"circle": (255, 60, 60), "square": (60, 200, 60), "triangle": (60, 100, 255),
                  "star": (255, 220, 40), "other": (200, 200, 200)}
MIN_AREA = 4  # pixels: smaller components are noise, not objects

# between the measured ranges (0.5th to 99.5th percentile on 1,200 ground-truth scenes):
# star solidity 0.66-0.95 vs others >= 1.05; triangle fill 0.44-0.55 vs circle/square >= 0.63
STAR_SOLIDITY, TRIANGLE_FILL, SQUARE_CORNERS = 1.0, 0.59, 0.35


def classify(solidity: float, fill: float, corners: float) -> str:
    """A region's shape from its measurements (the ShapesEval analyzer's thresholds)."""
    if solidity < STAR_SOLIDITY:
        return "star"
    if fill < TRIANGLE_FILL:
        return "triangle"
    return "square" if corners > SQUARE_CORNERS else "circle"


def solidity_of(core: np.ndarray) -> float:
    """A region's area over its convex hull's (pixel centres, so a filled convex shape scores above 1)."""
    ys, xs = np.nonzero(core)
    from scipy.spatial import ConvexHull, QhullError  # late: off generation's start-up path

    try:
        hull = ConvexHull(np.stack([xs, ys], 1).astype(float)).volume
    except (QhullError, ValueError):  # a line of pixels: no area
        return 2.0
    return float(core.sum() / max(hull, 1e-9))


@dataclass(frozen=True)
class Preprocessor:
    name: str
    fn: Callable[..., np.ndarray]
    summary: str
    threshold_a: tuple[str, float] | None = None  # (what it means, default): A1111's slider A
    threshold_b: tuple[str, float] | None = None


def _rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"a preprocessor takes an (H, W, 3) RGB image, got shape {image.shape}")
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def _white(mask: np.ndarray) -> np.ndarray:
    return np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)


def canny(image, low: float = 100.0, high: float = 200.0, sigma: float = 1.0) -> np.ndarray:
    """Canny edges of every colour channel (scikit-image), joined; low and high on a 0-255 scale."""
    from skimage.feature import canny as sk_canny

    img = _rgb(image).astype(np.float64)
    if not 0 <= low <= high:
        raise ValueError(f"canny needs 0 <= low <= high, got low {low}, high {high}")
    # A1111's 0-255 numbers are for OpenCV's Canny, which takes the Sobel magnitude of the raw image (a step
    # of v gives 4v); scikit-image smooths first (sigma 1 halves a step's peak gradient): thresholds / 2
    # keep the familiar meaning (a step of 60 levels is an edge at 100/200, one of 30 is not)
    edges = np.zeros(img.shape[:2], bool)
    for c in range(3):
        edges |= sk_canny(img[..., c], sigma=sigma, low_threshold=low / 2, high_threshold=high / 2)
    return _white(edges)


def regions(image, tolerance: float = 40.0) -> tuple[np.ndarray, int]:
    """(labels (H, W) int, count): connected components of the pixels whose colour is more than
    ``tolerance`` (Euclidean, 0-255 RGB) from the background's, label 0 being the background."""
    from scipy import ndimage  # late: off generation's start-up path

    img = _rgb(image).astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.sqrt(((img - background) ** 2).sum(-1)) > tolerance
    labels, count = ndimage.label(foreground)
    sizes = ndimage.sum(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    keep = np.concatenate([[0], np.cumsum(sizes >= MIN_AREA) * (sizes >= MIN_AREA)])
    return keep[labels], int((sizes >= MIN_AREA).sum())


def shape_of(mask: np.ndarray) -> str:
    """circle, square, triangle or star from a region's mask, by the ShapesEval analyzer's measurements."""
    ys, xs = np.nonzero(mask)
    if len(xs) < MIN_AREA:
        return "other"
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    fill = mask.sum() / ((x1 - x0 + 1) * (y1 - y0 + 1))
    corners = float(np.mean([mask[y, x] for y in (y0, y0 + 1, y1 - 1, y1) for x in (x0, x0 + 1, x1 - 1, x1)]))
    return classify(solidity_of(mask), fill, corners)


def segmentation(image, tolerance: float = 40.0) -> np.ndarray:
    labels, count = regions(image, tolerance)
    out = np.zeros((*labels.shape, 3), np.uint8)
    for k in range(1, count + 1):
        mask = labels == k
        out[mask] = SEGMENT_COLORS[shape_of(mask)]
    return out


def scribble(image, width: float = 2.0, tolerance: float = 40.0) -> np.ndarray:
    """Region outlines as white strokes ``width`` pixels thick (scaled with the image: per 64 pixels)."""
    from scipy import ndimage  # late: off generation's start-up path
    from skimage.segmentation import find_boundaries

    labels, _ = regions(image, tolerance)
    lines = find_boundaries(labels, mode="inner") & (labels > 0)
    grow = max(0, round(width * max(labels.shape) / 64 / 2) - 1)
    if grow:
        lines = ndimage.binary_dilation(lines, iterations=grow)
    return _white(lines)


def keypoints(image, scale: float = 1 / 3, tolerance: float = 40.0) -> np.ndarray:
    labels, count = regions(image, tolerance)
    h, w = labels.shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w), bool)
    for k in range(1, count + 1):
        ys, xs = np.nonzero(labels == k)
        cy, cx = ys.mean(), xs.mean()
        radius = np.sqrt(len(xs) / np.pi)  # of the disc with the object's area
        out |= (yy - cy) ** 2 + (xx - cx) ** 2 <= max(1.0, scale * radius) ** 2
    return _white(out)


def tile(image, down: float = 4.0) -> np.ndarray:
    """Down-sample by ``down`` (area), then up-sample back with bicubic: the layout without the detail."""
    img = Image.fromarray(_rgb(image))
    if down < 1:
        raise ValueError(f"tile's down-sampling rate must be >= 1, got {down}")
    small = img.resize((max(1, round(img.width / down)), max(1, round(img.height / down))), Image.BOX)
    return np.asarray(small.resize(img.size, Image.BICUBIC))


def none(image) -> np.ndarray:
    return _rgb(image)


PREPROCESSORS: dict[str, Preprocessor] = {
    "canny": Preprocessor("canny", canny, "Canny edges, white on black", ("Canny Low Threshold", 100.0),
                          ("Canny High Threshold", 200.0)),
    "scribble": Preprocessor("scribble", scribble, "region outlines as thick strokes", ("Stroke width", 2.0)),
    "segmentation": Preprocessor("segmentation", segmentation, "objects filled with their shape class's colour"),
    "keypoints": Preprocessor("keypoints", keypoints, "object centres as discs"),
    "tile": Preprocessor("tile", tile, "down-up sampled blur", ("Down Sampling Rate", 4.0)),
    "none": Preprocessor("none", none, "the image as given"),
}


def check_module(name: str) -> str:
    if name not in PREPROCESSORS:
        raise ValueError(f"preprocessor {name!r} unknown; choose one of: {', '.join(PREPROCESSORS)}")
    return name


def detect(name: str, image, resolution: int | None = None, threshold_a: float | None = None,
           threshold_b: float | None = None) -> np.ndarray:
    """Run preprocessor ``name`` on ``image`` (PIL or array). ``resolution``: the short side it runs at
    (A1111's processor_res); the map comes back at that size. Thresholds: its A1111 sliders A and B."""
    pre = PREPROCESSORS[check_module(name)]
    img = Image.fromarray(_rgb(image))
    if resolution is not None:
        if resolution < 8:
            raise ValueError(f"processor resolution must be >= 8 pixels, got {resolution}")
        scale = resolution / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    args = [v if v is not None else d[1] for v, d in ((threshold_a, pre.threshold_a), (threshold_b, pre.threshold_b))
            if d is not None]
    return pre.fn(np.asarray(img), *args)
