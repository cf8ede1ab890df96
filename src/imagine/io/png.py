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
import json
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from imagine.io.checkpoint import _FILE_MODE

FORMAT = "imagine/1"
_KV = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def file_hash(path: Path, length: int = 10) -> str:
    """The first ``length`` hex digits of a file's SHA-256 (10: A1111's "Model hash"; 64: all of it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def _quote(value: str) -> str:
    """Quote a value that holds the separators, as A1111 does."""
    return json.dumps(value) if ("," in value or ":" in value or "\n" in value) else value


def a1111_parameters(prompt: str, negative: str, fields: dict[str, Any]) -> str:
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def parse_a1111(text: str) -> dict[str, Any]:
    """A1111's ``parameters`` text -> {"Prompt": ..., "Negative prompt": ..., "Steps": "20", ...}.

    The last line holding ``Steps:`` starts the key-value list; lines before it are the prompt, up to a
    line starting ``Negative prompt:``. Quoted values are unquoted."""
    lines = text.strip().split("\n")
    kv_line = ""
    if lines and re.match(r"^\s*Steps:", lines[-1]):
        kv_line = lines.pop()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative).strip()}
    for key, value in _KV.findall(kv_line):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = value[1:-1]
        out[key.strip()] = value
    return out


def encode_png(pixels: np.ndarray, parameters: str, record: dict[str, Any]) -> bytes:
    """An (H, W, C) or (H, W) uint8 image as PNG bytes carrying both chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("imagine", json.dumps({"format": FORMAT, **record}, sort_keys=True))
    image = Image.fromarray(pixels.squeeze(-1) if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(path: Path, pixels: np.ndarray, parameters: str, record: dict[str, Any]) -> Path:
    """Write an (H, W, C) or (H, W) uint8 image with both chunks, atomically (never a half-written file)."""
    data = encode_png(pixels, parameters, record)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.chmod(tmp, _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_png_metadata(source: Path | bytes) -> tuple[str | None, dict[str, Any] | None]:
    """(A1111 parameters text, our JSON record) of a file or of image bytes; either may be None (A1111's
    images have no JSON)."""
    name = "the image" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            text = dict(img.info)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read {name} as an image ({err})") from err
    record = None
    if "imagine" in text:
        try:
            record = json.loads(text["imagine"])
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} has a corrupt imagine metadata chunk ({err})") from err
    parameters = text.get("parameters")
    return (parameters if isinstance(parameters, str) else None), record


def environment() -> dict[str, str]:
    import torch

    from imagine import __version__

    return {"imagine": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "numpy": np.__version__, "machine": platform.machine()}


def free_path(folder: Path, stem: str, suffix: str = ".png") -> Path:
    """folder/stem.png, or stem-1.png, stem-2.png...: never overwrite an existing file."""
    folder.mkdir(parents=True, exist_ok=True)
    path, k = folder / f"{stem}{suffix}", 1
    while path.exists():
        path, k = folder / f"{stem}-{k}{suffix}", k + 1
    return path
