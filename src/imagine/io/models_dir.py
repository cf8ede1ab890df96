"""A models folder laid out as AUTOMATIC1111's is: ``Stable-diffusion/`` (checkpoints: single files or
diffusers and imagine folders), ``VAE/``, ``Lora/``, ``ControlNet/``, ``embeddings/``, and ComfyUI's
``ipadapter/`` and ``clip_vision/`` for IP-Adapters and their image encoders, ``text_encoders/`` for the
separate text encoders of SD3 and Flux transformer files, and ``SR/`` for super-resolution
stages and cascades (``imagine train-sr``). Models are named by
file stem (or folder name) and also found by A1111's title "name [hash]" or short hash (the first 10
hex digits of the file's SHA-256); hashes are computed only when a lookup needs them, once per file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imagine.io.png import file_hash

SECTIONS = {"checkpoints": "Stable-diffusion", "vae": "VAE", "lora": "Lora", "controlnet": "ControlNet",
            "embeddings": "embeddings", "ipadapter": "ipadapter", "clip_vision": "clip_vision",
            "sr": "SR", "text_encoders": "text_encoders"}
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def default_models_dir() -> Path | None:
    """``models/`` under the working folder when it exists (as A1111's install folder has one)."""
    path = Path("models")
    return path if path.is_dir() else None


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path

    @property
    def hash_file(self) -> Path:
        """The file whose hash names the model: the file itself, or a folder's UNet weights."""
        if self.path.is_file():
            return self.path
        for candidate in ("unet/diffusion_pytorch_model.safetensors", "unet/model.safetensors",
                          "diffusion_pytorch_model.safetensors", "model.safetensors"):
            if (self.path / candidate).is_file():
                return self.path / candidate
        return self.path

    @property
    def sha256(self) -> str:
        return file_hash(self.hash_file, length=64) if self.hash_file.is_file() else ""

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:  # A1111's "name [hash]"
        return f"{self.name} [{self.short_hash}]"

    @property
    def bytes(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def entries(models_dir: Path | None, section: str) -> list[Entry]:
    """Files and model folders in one section of ``models_dir``, sorted by name (sub-folders included,
    named by their path inside the section as A1111 does)."""
    if models_dir is None:
        return []
    root = Path(models_dir) / SECTIONS[section]
    if not root.is_dir():
        return []
    found: list[Entry] = []

    def walk(folder: Path) -> None:
        for child in sorted(folder.iterdir()):
            if child.name.startswith(".") or (child.is_dir() and child.name.endswith("-training")):
                continue  # hidden, or an adapter run's checkpoints beside its result (OUT-training/)
            if child.is_file() and child.suffix in FILE_SUFFIXES:
                found.append(Entry(str(child.relative_to(root).with_suffix("")), child))
            elif child.is_dir() and any((child / marker).exists() for marker in
                                        ("model_index.json", "diffusion.json", "config.json", "cascade.json")):
                found.append(Entry(str(child.relative_to(root)), child))
            elif child.is_dir():
                walk(child)

    walk(root)
    return found


def find(models_dir: Path | None, section: str, name: str) -> Entry:
    """An entry by name, file name, A1111 title or hash; a KeyError listing what there is."""
    listed = entries(models_dir, section)
    for entry in listed:
        if name in (entry.name, entry.path.name):
            return entry
    for entry in listed:  # only now hash: a name lookup never reads the weights
        if name in (entry.title, entry.short_hash, entry.sha256):
            return entry
    where = Path(models_dir) / SECTIONS[section] if models_dir is not None else None
    choices = ", ".join(e.name for e in listed) or "none"
    raise KeyError(f"no {section} named {name!r} in {where or 'the models folder (none given)'}; "
                   f"there are: {choices}")


def resolve(value: str | Path, models_dir: Path | None, section: str = "checkpoints", *,
            confined: bool = False) -> Path:
    """A path as given when it exists, else a model of ``section`` in the models folder. ``confined`` (a
    server's requests): names in the models folder only, and the error says nothing of any other path."""
    if confined:
        try:
            return find(models_dir, section, str(value)).path
        except KeyError:
            choices = ", ".join(e.name for e in entries(models_dir, section)) or "none"
            raise FileNotFoundError(f"no {section} named {str(value)!r} in the models folder's "
                                    f"{SECTIONS[section]}/ (this server takes names, not paths); there are: "
                                    f"{choices}") from None
    path = Path(value)
    if path.exists():
        return path
    try:
        return find(models_dir, section, str(value)).path
    except KeyError as err:
        raise FileNotFoundError(f"{value} is not a file or folder, and {err.args[0]}") from None
