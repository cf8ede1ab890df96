"""PNG metadata: every image carries the settings that made it.

- ``parameters``: AUTOMATIC1111's text format, so A1111's PNG Info and other readers parse it:
      PROMPT
      Negative prompt: NEGATIVE
      Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64, ...
- ``imagine``: the full settings as versioned JSON (model identity and hash, sampler options, precision,
  device, library versions), from which ``imagine generate --from`` regenerates the same pixels.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import platform
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from imagine import __version__
from imagine.io.checkpoint import _FILE_MODE

FORMAT = "imagine/1"



_HASHES: dict[tuple[str, int, int], str] = {}
_HASHES_LOCK = threading.Lock()


def file_hash(path: Path, length: int = 10) -> str:
    """The first ``length`` hex digits of a file's SHA-256 (10: A1111's "Model hash"; 64: all of it).

    Computed once per file and process, cached by (path, size, mtime): at Stable Diffusion size a hash
    takes seconds, and every image records its model's. A changed file (new size or mtime) is hashed again."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    with _HASHES_LOCK:
        known = _HASHES.get(key)
    if known is None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        known = digest.hexdigest()
        with _HASHES_LOCK:
            _HASHES[key] = known
    return known[:length]


def encode_png(pixels: np.ndarray, parameters: str, record: dict[str, Any]) -> bytes:
    """An (H, W, C) or (H, W) uint8 image as PNG bytes carrying both chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("imagine", json.dumps({"format": FORMAT, **record}, sort_keys=True))
    image = Image.fromarray(pixels.squeeze(-1) if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_new(folder: Path, stem: str, data: bytes, suffix: str = ".png") -> Path:
    """Write ``data`` to folder/stem.png, or stem-1.png, stem-2.png...: never over an existing file, even
    when other threads or processes write into the same folder at the same moment, and never a
    half-written file under the final name.

    The bytes go to a temporary file first, which is then hard-linked to the first free name: link()
    fails if the name exists, atomically, so two writers can never claim the same one (O_EXCL's
    guarantee, with the atomicity of a rename). Where the file system has no hard links, the name is
    created with O_EXCL and written in place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _FILE_MODE)
        for k in itertools.count():
            path = folder / (f"{stem}{suffix}" if k == 0 else f"{stem}-{k}{suffix}")
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
            except OSError:  # no hard links here (some network and FAT file systems)
                return _write_exclusive(folder, stem, data, suffix)
    finally:
        Path(tmp).unlink(missing_ok=True)
    raise AssertionError("unreachable")


def _write_exclusive(folder: Path, stem: str, data: bytes, suffix: str) -> Path:
    for k in itertools.count():
        path = folder / (f"{stem}{suffix}" if k == 0 else f"{stem}-{k}{suffix}")
        try:
            with open(path, "xb") as f:
                f.write(data)
            os.chmod(path, _FILE_MODE)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def save_png(folder: Path, stem: str, pixels: np.ndarray, parameters: str, record: dict[str, Any]) -> Path:
    """Write an (H, W, C) or (H, W) uint8 image with both chunks as folder/stem.png (or the next free
    name, see ``write_new``); returns the path written."""
    return write_new(folder, stem, encode_png(pixels, parameters, record))


def read_png_metadata(source: Path | bytes) -> tuple[str | None, dict[str, Any] | None]:
    """(A1111 parameters text, our JSON record) of a file or of image bytes; either may be None (A1111's
    images have no JSON)."""
    name = "the image" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            text = dict(img.info)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        # ValueError: a text chunk that inflates past Pillow's limit
        raise ValueError(f"cannot read {name} as an image ({err})") from None
    record = None
    if "imagine" in text:
        try:
            record = json.loads(text["imagine"])
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} has a corrupt imagine metadata chunk ({err})") from err
    parameters = text.get("parameters")
    return (parameters if isinstance(parameters, str) else None), record


def environment() -> dict[str, str]:
    return {"imagine": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "numpy": np.__version__, "machine": platform.machine()}
