"""The models a server offers: looked up by name (never joined into paths), loaded once, shared read-only."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from imagine.io.model_folder import DiffusionModel, DiffusionSpec, load_model_folder
from imagine.io.png import file_hash


@dataclass
class ModelEntry:
    name: str
    path: Path
    sha256: str  # of the UNet weights, as A1111 hashes a checkpoint file
    spec: DiffusionSpec  # the model's defaults (steps, sampler, guidance) fill what a request leaves out

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
            probe = load_model_folder(folder)  # fail at start-up, not at the first request
            if probe.spec.text_encoder is None:
                raise ValueError(f"{folder} is not a text-to-image model (it has no text encoder); "
                                 "serve a model trained with a t2i preset")
            name, k = folder.name or "model", 2
            while name in self._entries:
                name, k = f"{folder.name}-{k}", k + 1
            self._entries[name] = ModelEntry(name, folder, file_hash(folder / "unet" / "model.safetensors", length=64),
                                              probe.spec)
        self.current = next(iter(self._entries))
        self._loaded: dict[str, tuple[DiffusionModel, object]] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def lookup(self, name: str | None) -> ModelEntry:
        """By name, A1111 title ("name [hash]") or short hash; None is the current model."""
        if name is None:
            return self._entries[self.current]
        for entry in self._entries.values():
            if name in (entry.name, entry.title, entry.short_hash, entry.sha256):
                return entry
        raise KeyError(f"model {name!r} unknown; choose one of: {', '.join(self._entries)}")

    def select(self, name: str) -> ModelEntry:
        entry = self.lookup(name)
        self.current = entry.name
        return entry

    def get(self, name: str) -> tuple[DiffusionModel, object]:
        """(model, text encoder), loaded on first use and kept."""
        from imagine.models.text_encoders import load_text_encoder

        entry = self.lookup(name)
        with self._lock:
            if entry.name not in self._loaded:
                model = load_model_folder(entry.path)
                model.unet.eval()
                if model.vae is not None:
                    model.vae.eval()
                self._loaded[entry.name] = (model, load_text_encoder(model.spec.text_encoder))
            return self._loaded[entry.name]
