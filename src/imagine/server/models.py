"""The models a server offers: imagine model folders, diffusers pipeline folders and single-file Stable
Diffusion checkpoints (and separate VAEs), looked up by name (never joined into paths), loaded once on
first use, shared read-only. At start-up only each model's spec is read (and its parts checked), so a
server with many models starts at once and holds in memory only the models it has served."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from imagine.devices import resolve_device
from imagine.io import models_dir as md
from imagine.io.model_folder import DiffusionModel, DiffusionSpec
from imagine.io.models_dir import Entry
from imagine.io.stable_diffusion import probe_family, probe_spec
from imagine.pipelines.request import load_text_model

AUTOMATIC = ("Automatic", "None", "")  # A1111's sd_vae values meaning "the model's own VAE"


@dataclass(frozen=True)
class ModelEntry(Entry):
    """A served model: its name, path and hashes (A1111's title "name [hash]", from io/models_dir.Entry)
    and its spec, whose defaults (steps, sampler, guidance) fill what a request leaves out."""

    spec: DiffusionSpec = None
    takes: dict = None  # which request fields and attachment kinds act on it (families.Family.takes)

    @property
    def weights(self) -> Path:
        return self.hash_file


class ModelStore:
    """Text-to-image model folders by name. The first is current until a client switches."""

    def __init__(self, folders: list[Path], vaes: list[Path] = (), allow_pickle: bool = False,
                 models_dir: Path | None = None, skip_broken: bool = False, device: str = "cpu",
                 offload: str = "auto"):
        """``skip_broken``: a model that cannot be read (a truncated file in the models folder) is listed in
        ``broken`` with the reason and the rest are served; otherwise it stops the start, as a model the
        user named should. ``device``: where the models run (devices.resolve_device)."""
        self.device = resolve_device(device)  # an absent device stops the start, with the reason
        self.offload = offload  # on a GPU: auto, none, model or sequential (request.load_text_model)
        if not folders:
            raise ValueError("no model to serve: pass --model PATH (an imagine or diffusers folder, or a "
                             "Stable Diffusion .safetensors) or --models-dir DIR")
        self._entries: dict[str, ModelEntry] = {}
        self.broken: dict[str, str] = {}  # path -> why it is not served
        for folder in folders:
            try:
                self.add(Path(folder), allow_pickle)  # a wrong model fails at start-up, not at the first request
            except (ValueError, OSError) as err:
                if not skip_broken:
                    raise
                self.broken[str(folder)] = str(err)
        if not self._entries:
            raise ValueError("no model to serve: every one is broken (" + "; ".join(self.broken.values())[:2000]
                             + ")")
        self.vaes = {Path(v).stem if Path(v).is_file() else Path(v).name: Path(v) for v in vaes}
        self.current = next(iter(self._entries))
        self.allow_pickle = allow_pickle  # .ckpt files: read with torch.load(weights_only=True)
        self.models_dir = models_dir  # its Lora/ is where requests' LoRAs are looked up
        # separate text encoders of SD3 and Flux transformer files (Forge's modules, with the VAEs)
        self.text_encoders = {e.name: e.path for e in md.entries(models_dir, "text_encoders")
                              if e.path.suffix == ".safetensors"}
        self._loaded: dict[tuple, tuple[DiffusionModel, object]] = {}
        self._lock = threading.Lock()
        self.loads = 0  # models read from disk so far (each at most once)

    def add(self, path: Path, allow_pickle: bool = False) -> ModelEntry:
        """Serve one more model (named by its stem, made unique); its spec is read now, its weights on use."""
        spec = _probe(path, allow_pickle)
        fam = probe_family(path, allow_pickle)
        takes = {**fam.takes(spec), "text_encoders": path.is_file() and fam.name in ("sd3", "flux")}
        stem = path.stem if path.is_file() else (path.name or "model")
        name, k = stem, 2
        while name in self._entries:
            name, k = f"{stem}-{k}", k + 1
        self._entries[name] = ModelEntry(name, path, spec, takes)
        return self._entries[name]

    def vae(self, name: str | None) -> str | None:
        """A VAE's name as served (by name or file name), None for the model's own; KeyError if unknown."""
        if name is None or name in AUTOMATIC:
            return None
        for key, path in self.vaes.items():
            if name in (key, path.name):
                return key
        raise KeyError(f"VAE {name!r} unknown; choose Automatic or one of: {', '.join(self.vaes) or 'none'}")

    def modules(self, names) -> tuple[Path, ...]:
        """Forge's ``forge_additional_modules`` / our ``text_encoders``: separate text encoder and VAE files by
        name, file name or the path /sdapi/v1/sd-modules lists; KeyError naming the choices if one is unknown."""
        known = {**self.text_encoders, **self.vaes}
        found: list[Path] = []
        for name in names or ():
            path = next((p for key, p in known.items() if str(name) in (key, p.name, str(p.resolve()))), None)
            if path is None:
                raise KeyError(f"text encoder {name!r} unknown; choose from the models folder's text_encoders/ "
                               f"and VAE/: {', '.join(known) or 'none'}")
            if path not in found:
                found.append(path)
        return tuple(found)

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
        bare = name.rsplit(" [", 1)[0]  # A1111's "file.safetensors [hash]" and file names with their extension
        bare = bare[: -len(Path(bare).suffix)] if Path(bare).suffix in (".safetensors", ".ckpt") else bare
        if bare != name and bare in self._entries:
            return self._entries[bare]
        raise KeyError(f"model {name!r} unknown; choose one of: {', '.join(self._entries)}")

    def select(self, name: str) -> ModelEntry:
        entry = self.lookup(name)
        self.current = entry.name
        return entry

    def get(self, name: str, vae: str | None = None, modules=()) -> tuple[DiffusionModel, object]:
        """(model, text encoder), loaded on first use and kept: each model (with each VAE and set of separate
        parts) is read once. ``modules``: names as ``modules`` takes them; for a model that carries its own text
        encoders a VAE among them is its VAE (as Forge does) and a text encoder is refused (ValueError)."""
        entry, vae, parts = self.lookup(name), self.vae(vae), self.modules(modules)
        if parts and not entry.takes.get("text_encoders"):
            extra = [p for p in parts if p not in self.vaes.values()]
            if extra or len(parts) > 1 or vae is not None:
                raise ValueError(f"{entry.name} carries its own text encoders; separate text encoder files are "
                                 f"for SD3 and Flux transformer files (and one VAE at most): "
                                 f"{', '.join(p.name for p in parts)}")
            vae, parts = next(key for key, p in self.vaes.items() if p == parts[0]), ()
        key = (entry.name, vae, parts)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = load_text_model(entry.path, vae=self.vaes[vae] if vae else None,
                                                    allow_pickle=self.allow_pickle, modules=parts, device=self.device,
                                                    offload=self.offload)
                self.loads += 1
            return self._loaded[key]

    def is_loaded(self, name: str) -> bool:
        return any(key[0] == self.lookup(name).name for key in self._loaded)


def _probe(path: Path, allow_pickle: bool = False) -> DiffusionSpec:
    """A model's spec, and a check that its parts are there, without reading the weights."""
    spec = probe_spec(path, allow_pickle)
    if spec.text_encoder is None:
        raise ValueError(f"{path} is not a text-to-image model (it has no text encoder); "
                         "serve a model trained with a t2i preset")
    return spec
