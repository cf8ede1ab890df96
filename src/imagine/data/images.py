"""Image datasets: any folder of images, and built-in data that ships in packages (no downloads).

Every dataset returns float images in [-1, 1], shaped (C, H, W), and an integer class label (0 when the
data has no classes). Randomness (flips) is the caller's: ``item(i, flip=...)`` is deterministic, so a
training run can reproduce item i's exact pixels on resume.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from imagine.data.shapes import ShapesDataset
from imagine.data.vocabulary import caption_vocabulary

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DataError(ValueError):
    """A dataset that cannot be used as asked (empty folder, unreadable image, bad size)."""


def _to_tensor(img: Image.Image, size: int, channels: int) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic, antialiased), center-crop to size x size, scale to [-1, 1]."""
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


@dataclass
class ImageDataset:
    """A list of images held in memory, with labels and class names."""

    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor  # (N,) int64
    class_names: tuple[str, ...]
    source: str
    captions: tuple[str, ...] | None = None
    infinite = False

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def vocabulary(self) -> frozenset[str] | None:
        """The words of the captions (None without captions)."""
        return caption_vocabulary(self.captions) if self.captions is not None else None

    def batch(self, indices: Sequence[int], flips: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
        """(images, labels, captions or None) of these items, flipped where ``flips`` says."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]
        if flips is not None and flips.any():
            x = torch.where(flips.reshape(-1, 1, 1, 1), x.flip(-1), x)
        captions = [self.captions[i] for i in idx.tolist()] if self.captions is not None else None
        return x, self.labels[idx], captions


def read_captions(root: Path, files: list[Path], default: str | None = None) -> tuple[str, ...]:
    """Each image's caption: a same-name .txt beside it (kohya's convention), else a ``metadata.jsonl`` in
    ``root`` with {"file_name": ..., "text": ...} lines (Hugging Face imagefolder's), else ``default``;
    without a default every image needs one."""
    meta: dict[str, str] = {}
    jsonl = root / "metadata.jsonl"
    if jsonl.exists():
        for n, line in enumerate(jsonl.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                meta[str(row["file_name"])] = str(row.get("text", row.get("caption")))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{jsonl}:{n} is not a {{\"file_name\": ..., \"text\": ...}} line ({err})") from err
    captions, missing = [], []
    for p in files:
        txt = p.with_suffix(".txt")
        if txt.exists():
            captions.append(txt.read_text().strip())
        elif p.relative_to(root).as_posix() in meta:
            captions.append(meta[p.relative_to(root).as_posix()])
        elif default is not None:
            captions.append(default)
        else:
            missing.append(p.name)
    if missing:
        raise DataError(f"{len(missing)} images have no caption (e.g. {', '.join(missing[:3])}): add a same-name "
                        ".txt beside each, or a metadata.jsonl with file_name and text")
    return tuple(captions)


def load_folder(root: Path | str, size: int, channels: int = 3, class_from_subfolders: bool = False,
                captions: bool = False, default_caption: str | None = None) -> ImageDataset:
    """Every image under ``root`` (jpg, png, webp, bmp; any count, no minimum), resized and center-cropped.
    With ``class_from_subfolders`` the first-level sub-folder names are the classes; with ``captions``
    each image's caption is read (see ``read_captions``; ``default_caption`` for images without one)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if class_from_subfolders:
        names = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        if not names:
            raise DataError(f"{root} has no sub-folders to take classes from; put each class in its own folder")
        files = [p for p in files if len(p.relative_to(root).parts) > 1]
        labels = [names.index(p.relative_to(root).parts[0]) for p in files]
    else:
        names, labels = ["image"], [0] * len(files)
    tensors = []
    for p in files:
        try:
            with Image.open(p) as img:
                tensors.append(_to_tensor(img, size, channels))
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"cannot read {p} as an image ({err}); remove or fix it") from err
    texts = read_captions(root, files, default_caption) if captions else None
    return ImageDataset(torch.stack(tensors), torch.tensor(labels), tuple(names), str(root), texts)


def load_digits(size: int = 16) -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits (8 x 8, 17 grey levels), upscaled bicubically to ``size``,
    10 classes. Ships inside scikit-learn: nothing is downloaded."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:  # pragma: no cover - sklearn is a dependency
        raise DataError("builtin:digits needs scikit-learn (pip install scikit-learn)") from err
    digits = sk_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    return ImageDataset(images.contiguous(), torch.from_numpy(digits.target).long(),
                        tuple(str(i) for i in range(10)), "builtin:digits")


def _shapes(size: int):
    return ShapesDataset(size=size)


def _shapes_language(size: int):
    return ShapesDataset(size=size, language=True, source="builtin:shapes-language")


BUILTIN = {"builtin:digits": load_digits, "builtin:shapes": _shapes, "builtin:shapes-language": _shapes_language}


def load_dataset(spec: str, size: int, channels: int = 3, class_from_subfolders: bool = False,
                 captions: bool = False):
    """``builtin:NAME`` or a folder path."""
    if spec.startswith("builtin:"):
        if spec not in BUILTIN:
            raise DataError(f"unknown built-in dataset {spec!r}; choose one of: {', '.join(BUILTIN)}")
        return BUILTIN[spec](size)
    return load_folder(spec, size, channels, class_from_subfolders, captions)
