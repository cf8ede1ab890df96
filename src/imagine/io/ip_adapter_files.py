"""IP-Adapter files (STYLE rule 15: formats live at the edge).

Read: the original layout (``image_proj.*`` and ``ip_adapter.{k}.*`` keys), as a .safetensors file or,
with --allow-pickle, the original .bin (a dict of two state dicts, loaded with weights_only=True); a folder
holding one such file; the image encoder from, in order, the caller, the file's own record, an
``image_encoder/`` folder beside the file or its folder (diffusers' and h94's layout), or the models
folder's ``clip_vision/``. Written: one .safetensors in that layout, with the config and the image
encoder's name in its metadata, so it loads in diffusers' ``load_ip_adapter`` as it is.

The variants that need other projection modules (Plus's Resampler, Full Face's MLP, FaceID's LoRAs) are
recognised and refused by name."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from imagine.io.checkpoint import CheckpointError, atomic_save_safetensors, load_state_strict, read_safetensors
from imagine.models.ip_adapter import IPAdapter, IPAdapterConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class IPAdapterFile:
    model: IPAdapter
    encoder: str | None  # what it reads: a builtin encoder name or a folder
    path: Path
    info: dict = field(default_factory=dict)  # what imagine recorded (base model, training)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def weights(self) -> Path:
        return weights_file(self.path)


def weights_file(path: Path) -> Path:
    """The weights of an IP-Adapter path: the file, or the one file in a folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        preferred = [p for p in found if "ip" in p.name.lower() and "adapter" in p.name.lower()]
        if len(preferred or found) == 1:
            return (preferred or found)[0]
        raise CheckpointError(f"{path} holds {len(found)} weight files ({', '.join(p.name for p in found) or 'none'}); "
                              "name the IP-Adapter file itself")
    raise CheckpointError(f"no IP-Adapter at {path}")


def _read(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if not allow_pickle:
        raise CheckpointError(f"{path} is a pickle (.bin); imagine reads .safetensors only, because unpickling a "
                              "file can run code. Convert it where you trust it, or pass --allow-pickle to read "
                              "it with torch.load(weights_only=True), which loads tensors and nothing else")
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(f"refusing {path}: it cannot be loaded with torch.load(weights_only=True) "
                              f"({type(err).__name__})") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    flat = {}
    for key, value in raw.items():  # the original .bin: {"image_proj": {...}, "ip_adapter": {...}}
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    if not all(isinstance(v, torch.Tensor) for v in flat.values()):
        raise CheckpointError(f"{path} holds things other than tensors")
    return flat, {}


def describe_keys(keys) -> str | None:
    """What kind of IP-Adapter these keys are, or None when they are not one."""
    keys = set(keys)
    if not any(k.startswith("image_proj.") for k in keys) or not any(k.startswith("ip_adapter.") for k in keys):
        return None
    if "image_proj.latents" in keys:
        return "IP-Adapter Plus (a Resampler over the encoder's patch states)"
    if "image_proj.proj.3.weight" in keys or "image_proj.proj.0.weight" in keys:
        return "IP-Adapter Full Face (an MLP projection)"
    if any("perceiver_resampler" in k for k in keys):
        return "IP-Adapter FaceID Plus"
    if any("lora" in k for k in keys) or ("image_proj.norm.weight" in keys and "image_proj.proj.weight" not in keys):
        return "IP-Adapter FaceID (face-recognition embeddings and LoRAs)"
    return "IP-Adapter"


def is_ip_adapter(path: Path) -> bool:
    """Whether a file (or folder) holds an IP-Adapter, from its key names alone (no tensors read)."""
    try:
        weights = weights_file(path)
    except CheckpointError:
        return False
    if weights.suffix != ".safetensors":
        return "ip" in weights.name.lower() and "adapter" in weights.name.lower()

    try:
        with safe_open(str(weights), framework="pt") as f:
            return describe_keys(f.keys()) is not None
    except Exception:
        return False


def peek(path: Path) -> dict:
    """An imagine-written adapter's record (encoder, base model) without reading tensors; {} otherwise."""
    try:
        weights = weights_file(path)
        if weights.suffix != ".safetensors":
            return {}
        with safe_open(str(weights), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("imagine", "{}"))
    except Exception:
        return {}


def _beside(weights: Path) -> Path | None:
    for folder in (weights.parent, weights.parent.parent):
        if (folder / "image_encoder" / "config.json").is_file():
            return folder / "image_encoder"
    return None


def load_ip_adapter(path: Path | str, *, image_encoder: str | Path | None = None, models_dir: Path | None = None,
                    allow_pickle: bool = False) -> IPAdapterFile:
    """An IP-Adapter and the image encoder it reads; every refusal names what was expected and found."""
    path = Path(path)
    weights = weights_file(path)
    state, metadata = _read(weights, allow_pickle)
    kind = describe_keys(state)
    if kind is None:
        raise CheckpointError(f"{weights} is not an IP-Adapter: it has no image_proj.* and ip_adapter.* tensors "
                              f"(it has {len(state)} tensors, e.g. {sorted(state)[:3]})")
    if kind != "IP-Adapter":
        raise CheckpointError(f"{weights} is an {kind}; imagine reads the plain IP-Adapter layout (image_proj.proj "
                              "and .norm, ip_adapter.N.to_k_ip / to_v_ip), as ip-adapter_sd15 and ip-adapter_sdxl "
                              "files and those `imagine train-ip-adapter` writes have it")
    if "config" in metadata:
        config = IPAdapterConfig.from_dict(json.loads(metadata["config"]))
    else:  # a foreign file: the config its shapes imply
        ids = sorted({int(k.split(".")[1]) for k in state if k.startswith("ip_adapter.")})
        if ids != list(range(1, 2 * len(ids), 2)):
            raise CheckpointError(f"{weights}: its layers are numbered {ids[:6]}..., not 1, 3, 5, ... as IP-Adapter "
                                  "files number them")
        proj = state["image_proj.proj.weight"]
        cross = state["image_proj.norm.weight"].shape[0]
        config = IPAdapterConfig(proj.shape[1], cross, tuple(state[f"ip_adapter.{i}.to_k_ip.weight"].shape[0]
                                                             for i in ids), proj.shape[0] // cross)
    model = IPAdapter(config)
    load_state_strict(model, {k: v.float() for k, v in state.items()}, str(weights))
    info = json.loads(metadata.get("imagine", "{}"))
    encoder = image_encoder or info.get("image_encoder") or _beside(weights)
    if encoder is None and models_dir is not None and (Path(models_dir) / "clip_vision").is_dir():
        folders = [p for p in sorted((Path(models_dir) / "clip_vision").iterdir()) if (p / "config.json").is_file()]
        if len(folders) == 1:
            encoder = folders[0]
    return IPAdapterFile(model.eval().requires_grad_(False), str(encoder) if encoder is not None else None, path,
                         info)


def save_ip_adapter(model: IPAdapter, path: Path, image_encoder: str, info: dict | None = None,
                    dtype: torch.dtype = torch.float32) -> Path:
    """One .safetensors in the original layout (diffusers loads it), config and encoder in the metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"an IP-Adapter is written as a .safetensors file, not {path.name}")
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    record = {"image_encoder": image_encoder, **(info or {})}
    atomic_save_safetensors(tensors, path, {"config": json.dumps(asdict(model.config)), "format": "pt",
                                            "imagine": json.dumps(record)})
    return path
