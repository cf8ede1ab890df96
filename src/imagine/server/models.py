"""The models a server offers: looked up by name (never joined into paths), loaded once on first use,
shared read-only. At start-up only each folder's spec is read (and its weight files checked), so a
server with many models starts at once and holds in memory only the models it has served."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from imagine.io.checkpoint import CheckpointError, read_json
from imagine.io.model_folder import SPEC_NAME, DiffusionModel, DiffusionSpec
from imagine.io.png import file_hash


@dataclass
class ModelEntry:
    name: str
    path: Path
    spec: DiffusionSpec  # the model's defaults (steps, sampler, guidance) fill what a request leaves out

    @property
    def weights(self) -> Path:
        return self.path / "unet" / "model.safetensors"

    @property
    def sha256(self) -> str:
        """Of the UNet weights, as A1111 hashes a checkpoint file: computed on first use, once per file."""
        return file_hash(self.weights, length=64)

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:  # A1111's "name [hash]"
        return f"{self.name} [{self.short_hash}]"


class ModelStore:
    """Text-to-image model folders by name. The first is current until a client switches."""

    def __init__(self, folders: list[Path]):
        if not folders:
            raise ValueError("no model to serve: pass --model DIR (a folder written by `imagine train`)")
        self._entries: dict[str, ModelEntry] = {}
        for folder in folders:
            folder = Path(folder)
            spec = _probe(folder)  # a wrong folder fails at start-up, not at the first request
            name, k = folder.name or "model", 2
            while name in self._entries:
                name, k = f"{folder.name}-{k}", k + 1
            self._entries[name] = ModelEntry(name, folder, spec)
        self.current = next(iter(self._entries))
        self._loaded: dict[str, tuple[DiffusionModel, object]] = {}
        self._lock = threading.Lock()
        self.loads = 0  # models read from disk so far (each at most once)

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def lookup(self, name: str | None) -> ModelEntry:
        """By name, A1111 title ("name [hash]") or short hash; None is the current model."""
        if name is None:
            return self._entries[self.current]
        if name in self._entries:  # by name first: matching a title or hash reads (and hashes) the weights
            return self._entries[name]
        for entry in self._entries.values():
            if name in (entry.title, entry.short_hash, entry.sha256):
                return entry
        raise KeyError(f"model {name!r} unknown; choose one of: {', '.join(self._entries)}")

    def select(self, name: str) -> ModelEntry:
        entry = self.lookup(name)
        self.current = entry.name
        return entry

    def get(self, name: str) -> tuple[DiffusionModel, object]:
        """(model, text encoder), loaded on first use and kept: each model is read from disk once."""
        from imagine.pipelines.request import load_text_model

        entry = self.lookup(name)
        with self._lock:
            if entry.name not in self._loaded:
                self._loaded[entry.name] = load_text_model(entry.path)
                self.loads += 1
            return self._loaded[entry.name]

    def is_loaded(self, name: str) -> bool:
        return self.lookup(name).name in self._loaded


def _probe(folder: Path) -> DiffusionSpec:
    """A model folder's spec, and a check that its weight files are there, without reading the weights."""
    if not (folder / SPEC_NAME).is_file():
        raise CheckpointError(f"{folder} has no {SPEC_NAME}: is it an imagine model folder?")
    spec = DiffusionSpec.from_dict(read_json(folder / SPEC_NAME))
    if spec.text_encoder is None:
        raise ValueError(f"{folder} is not a text-to-image model (it has no text encoder); "
                         "serve a model trained with a t2i preset")
    needed = ["unet"] + (["vae"] if spec.latent else [])
    for part in needed:
        if not (folder / part / "model.safetensors").is_file():
            raise CheckpointError(f"{folder} has no {part}/model.safetensors: the model folder is incomplete")
    return spec
