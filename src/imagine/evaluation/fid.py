"""FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) over a pluggable feature extractor.

Features come from any ``torch.nn.Module`` (or callable) mapping images (N, 3, H, W) in [-1, 1] to (N, D):
our CLIP image tower (domain features for builtin:shapes), pytorch-fid's Inception when a user has its
weight file (imagine.models.inception), or anything else. KID is unbiased, so it means something at a few
hundred samples where FID is biased upward; it comes with the spread over subsets and a 95% interval.
Reference statistics are cached (safetensors, keyed by extractor and source) so they are computed once."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save
from scipy import linalg

from imagine.data.shapes import ShapesDataset
from imagine.io.checkpoint import atomic_write_bytes
from imagine.io.networks import load_clip, load_fid_inception
from imagine.io.png import file_hash
from imagine.weights import default_clip

Extractor = Callable[[torch.Tensor], torch.Tensor]
HELD_OUT_START = 10_000_000  # builtin:shapes scene indices from here on are never drawn in training


@dataclass
class Features:
    """Features of one image set: kept whole for KID, summarized (mean, covariance) for FID."""

    features: np.ndarray  # (N, D) float64

    @property
    def mu(self) -> np.ndarray:
        return self.features.mean(0)

    @property
    def sigma(self) -> np.ndarray:
        return np.cov(self.features, rowvar=False)

    def save(self, path: Path, meta: dict) -> None:
        data = save({"features": torch.from_numpy(self.features)}, metadata={"imagine": json.dumps(meta)})
        atomic_write_bytes(Path(path), data)

    @classmethod
    def load(cls, path: Path) -> Features:
        return cls(load_file(str(path))["features"].double().numpy())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance of two Gaussians."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: nudge both covariances (as pytorch-fid does)
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real  # imaginary parts are numerical noise of the square root
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(a: Features, b: Features) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 with the kernel k(a, b) = (a.b / d + coef0)^degree (KID's kernel)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + coef0) ** degree, (y @ y.T / d + coef0) ** degree,
                     (x @ y.T / d + coef0) ** degree)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


@dataclass(frozen=True)
class KID:
    mean: float
    std: float  # over subsets
    subsets: int

    @property
    def interval(self) -> tuple[float, float]:
        """A conservative 95% interval: mean +- 1.96 x the spread of one subset's estimate. (The spread of
        the mean over subsets would be std / sqrt(subsets), but subsets drawn from one sample overlap, so
        that understates the sampling uncertainty.)"""
        return self.mean - 1.96 * self.std, self.mean + 1.96 * self.std


def kid(a: Features, b: Features, subsets: int = 50, subset_size: int = 100, seed: int = 0) -> KID:
    """KID: the unbiased polynomial MMD^2 averaged over random subsets (Binkowski et al. 2018)."""
    x, y = a.features, b.features
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    values = [polynomial_mmd2(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(subsets)]
    return KID(float(np.mean(values)), float(np.std(values, ddof=1)) if subsets > 1 else 0.0, subsets)


@torch.no_grad()
def extract(extractor: Extractor, batches: Iterable[torch.Tensor]) -> Features:
    """Features of image batches (each (N, 3, H, W) in [-1, 1]; uint8 (N, H, W, 3) arrays are converted)."""
    out = []
    for batch in batches:
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(extractor(batch).double().cpu().numpy())
    if not out:
        raise ValueError("no images to extract features from")
    return Features(np.concatenate(out))


def folder_images(folder: Path) -> list[Path]:
    """A folder's images (png/jpg/webp), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ValueError(f"{folder} holds no images (.png, .jpg, .jpeg, .webp)")
    return files


def folder_batches(folder: Path, size: int | None, batch: int = 64) -> Iterable[np.ndarray]:
    """A folder's images as RGB uint8 batches (N, H, W, 3): resized to size x size (bicubic), or at their
    own size when ``size`` is None (the extractor resizes, as pytorch-fid does; the sizes must then agree)."""
    files = folder_images(folder)
    for start in range(0, len(files), batch):
        arrays = []
        for path in files[start:start + batch]:
            with Image.open(path) as img:
                img = img.convert("RGB")
                arrays.append(np.asarray(img if size is None else img.resize((size, size), Image.BICUBIC)))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            sizes = ", ".join(sorted(f"{w}x{h}" for h, w, _ in shapes))
            raise ValueError(f"images in {folder} differ in size ({sizes}); pass a size to resize them all")
        yield np.stack(arrays)


def folder_id(folder: Path) -> str:
    """Names, sizes and modification times of a folder's images: a cache key that changes with them."""
    files = folder_images(folder)
    listing = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return f"{Path(folder).resolve()}#{len(files)}#{hashlib.sha256(listing.encode()).hexdigest()[:16]}"


def cached_reference(extractor: Extractor, extractor_id: str, source_id: str,
                     batches: Callable[[], Iterable[torch.Tensor]], cache_dir: Path) -> Features:
    """Reference features, from ``cache_dir`` when the same (extractor, source) was seen before."""
    key = hashlib.sha256(f"{extractor_id}|{source_id}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"reference-{key}.safetensors"
    if path.exists():
        return Features.load(path)
    feats = extract(extractor, batches())
    path.parent.mkdir(parents=True, exist_ok=True)
    feats.save(path, {"extractor": extractor_id, "source": source_id, "n": len(feats.features)})
    return feats


def shapes_reference_batches(size: int, n: int, batch: int = 64) -> Iterable[np.ndarray]:
    """``n`` builtin:shapes scenes the training run never drew (indices from 10,000,000 on), as uint8 batches."""
    dataset = ShapesDataset(size)
    for start in range(0, n, batch):
        yield np.stack([dataset.scene(HELD_OUT_START + i)[1] for i in range(start, min(n, start + batch))])


@dataclass(frozen=True)
class Comparison:
    """FID and KID of one image set against a reference, with the sample sizes that qualify them."""

    fid: float
    kid: KID
    n_generated: int
    n_reference: int

    def to_json(self) -> dict:
        low, high = self.kid.interval
        return {"fid": self.fid, "kid": self.kid.mean, "kid_std": self.kid.std, "kid_interval": [low, high],
                "kid_subsets": self.kid.subsets, "n_generated": self.n_generated, "n_reference": self.n_reference}


def compare(generated: Features, reference: Features, subsets: int = 50, subset_size: int = 100,
            seed: int = 0) -> Comparison:
    return Comparison(fid(generated, reference), kid(generated, reference, subsets, subset_size, seed),
                      len(generated.features), len(reference.features))


def feature_extractor(features: str, clip: Path | None = None, inception: Path | None = None
                      ) -> tuple[Extractor, str]:
    """(extractor, its identity for the cache) for ``features`` = "clip" (a CLIP-style model folder,
    default the shipped shapes scorer) or "inception" (pytorch-fid's weight file, which the user has)."""
    if features == "inception":
        if inception is None:
            raise ValueError("Inception features need pytorch-fid's weight file, and imagine downloads nothing: "
                             "pass --inception PATH/pt_inception-2015-12-05-6726825d.pth (pytorch-fid's GitHub "
                             "releases), or use --features clip")
        return load_fid_inception(inception), f"inception:{file_hash(inception, 16)}"
    if features != "clip":
        raise ValueError(f"feature space {features!r} unknown; choose clip or inception")

    clip_dir = Path(clip) if clip is not None else default_clip()
    return load_clip(clip_dir).fid_features, f"clip:{file_hash(clip_dir / 'model.safetensors', 16)}"


def reference_source(reference: str, generated: Path, size: int | None, count: int
                     ) -> tuple[str, Callable[[], Iterable[np.ndarray]]]:
    """(source identity for the cache, a function giving its image batches) for a reference folder or
    builtin:shapes (held-out scenes rendered at the generated images' size, or ``size``)."""
    first_image = folder_images(generated)[0]  # a missing or empty folder fails before any work
    if reference == "builtin:shapes":
        with Image.open(first_image) as first:
            side = size or first.width
        return f"builtin:shapes:{side}:{count}", lambda: shapes_reference_batches(side, count)
    return f"{folder_id(Path(reference))}:{size}", lambda: folder_batches(Path(reference), size)
