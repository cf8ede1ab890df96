"""A finished image: its pixels, the settings that made it (A1111's text and our JSON record), its PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imagine.io.png import encode_png, write_new


@dataclass
class Generated:
    """One finished image: pixels and the settings that made it."""

    pixels: np.ndarray  # (H, W, C) uint8
    seed: int
    parameters: str  # A1111's text
    record: dict[str, Any]  # our JSON record
    stem: str = ""  # the file name it is saved under, before .png (default: SEED-KIND)

    def __post_init__(self):
        self.stem = self.stem or f"{self.seed:06d}-{self.record['kind']}"

    def png(self) -> bytes:
        return encode_png(self.pixels, self.parameters, self.record)


def save(results: list[Generated], folder: Path) -> list[Path]:
    """Write each image as folder/SEED-KIND.png (the next free name if taken; never over a file)."""
    return [write_new(Path(folder), r.stem, r.png()) for r in results]
