"""Image prompts: IP-Adapters attached to a UNet for one request.

A request's image prompts (``ImagePromptUnit``: an image, a scale, which adapter, the share of the steps)
become ``Prompted`` entries: the adapter, its image encoder's embedding of the image and the scale. Before
sampling each adapter turns the embedding into tokens for the conditional rows and the zero embedding into
tokens for the unconditional ones (as the adapter was trained with dropped images, and as diffusers does),
so classifier-free guidance pushes toward the image. ``ImagePrompted`` wraps the UNet: at each call it
hands every active prompt's tokens and projections to the cross-attention layers through the context pair
(nn/attention.py). Several prompts, of one adapter or several, add up; with none active, or every scale 0,
the UNet runs exactly as without them.

Which adapter: a name or path, or by ``type`` the first that reads that kind of embedding and fits the base
model: the models folder's ipadapter/ (ComfyUI's folder), then IP-Adapters in its ControlNet/ (where A1111's
extension keeps them), then the shipped ones (weights/ip-adapter/). Types: content (a CLIP-style image
embedding), palette and intensity (Composer's global conditions, models/image_encoders.py)."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from imagine.a1111 import ip_adapter_field
from imagine.adapters.attachment import Attachment
from imagine.adapters.control import from_b64, png_b64, step_progress
from imagine.devices import module_device
from imagine.io.ip_adapter_files import IPAdapterFile, is_ip_adapter, load_ip_adapter, peek, weights_file
from imagine.io.models_dir import Entry, entries, resolve
from imagine.io.networks import cached_image_encoder
from imagine.io.png import file_hash
from imagine.models.ip_adapter import IPAdapterConfig, check_fits, cross_attention_layers

TYPES = ("content", "palette", "intensity")
TOKENS = "image_prompt_tokens"  # the conditioning key: each row's image tokens, every prompt's side by side
MAX_SIDE = 512  # references are kept (and encoded) at most this large, so the record can hold them


def builtin_ip_adapters() -> list[Path]:
    root = Path(__file__).resolve().parent.parent / "weights" / "ip-adapter"
    return sorted(root.glob("*.safetensors")) if root.is_dir() else []


def adapter_type(encoder: str | None) -> str:
    return encoder if encoder in ("palette", "intensity") else "content"





def candidates(models_dir: Path | None) -> list[Path]:
    found = [e.path for e in entries(models_dir, "ipadapter")]
    found += [e.path for e in entries(models_dir, "controlnet") if is_ip_adapter(e.path)]
    return found + builtin_ip_adapters()


def available(models_dir: Path | None) -> list[tuple[str, Path]]:
    """("name [hash]", path) of every IP-Adapter: ipadapter/, ControlNet/'s, then the shipped ones."""
    return [(Entry(p.stem if p.is_file() else p.name, p).title, p) for p in candidates(models_dir)]


def _fits(path: Path, unet) -> bool | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = json.loads((f.metadata() or {}).get("config", "null"))
    except Exception:
        return None
    if not raw:
        return None

    want = IPAdapterConfig.for_unet(unet, 1)
    return (raw.get("cross_attention_dim"), tuple(raw.get("layer_widths", ()))) == (want.cross_attention_dim,
                                                                                   want.layer_widths)


def find_ip_adapter(kind: str, models_dir: Path | None, unet) -> Path:
    seen = []
    for path in candidates(models_dir):
        encoder = peek(path).get("image_encoder")
        found = adapter_type(encoder)
        seen.append(f"{path.stem if path.is_file() else path.name} ({found})")
        if found == kind and _fits(path, unet) is not False:
            return path
    raise ValueError(f"no {kind} IP-Adapter that fits this model (looked in the models folder's ipadapter/ and "
                     f"ControlNet/ and the shipped ones: {', '.join(seen) or 'none'}); train one with `imagine "
                     f"train-ip-adapter --image-encoder {'shapes-clip' if kind == 'content' else kind}` or name "
                     "one: --image-prompt TYPE@NAME:IMAGE")


_CACHE: OrderedDict[tuple, IPAdapterFile] = OrderedDict()


def cached_ip_adapter(path: Path, models_dir: Path | None = None, allow_pickle: bool = False) -> IPAdapterFile:
    weights = weights_file(path)
    stat = weights.stat()
    key = (str(weights.resolve()), stat.st_mtime_ns, stat.st_size, str(models_dir))
    if key not in _CACHE:
        _CACHE[key] = load_ip_adapter(path, models_dir=models_dir, allow_pickle=allow_pickle)
        while len(_CACHE) > 6:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key]


@dataclass(frozen=True)
class ImagePromptUnit:
    """One image prompt of a request. model: a name (models folder or shipped) or path, or None: the first
    adapter of ``type`` that fits the base model."""

    image: Image.Image | None = field(default=None, repr=False)
    scale: float = 1.0
    model: str | None = None
    type: str = "content"
    start: float = 0.0
    end: float = 1.0
    input: dict | None = None  # where the image came from (path and hash), for the record

    def check(self) -> ImagePromptUnit:
        for name in ("scale", "start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
                raise ValueError(f"image prompt {name} must be a finite number, got {v!r}")
        if not 0 <= self.start <= self.end <= 1:
            raise ValueError(f"image prompt start and end must satisfy 0 <= start <= end <= 1 (fractions of the "
                             f"steps), got {self.start} and {self.end}")
        if self.type not in TYPES:
            raise ValueError(f"image prompt type {self.type!r} unknown; choose one of: {', '.join(TYPES)}")
        if self.image is None:
            raise ValueError("an image prompt needs an image")
        return replace(self, scale=float(self.scale), start=float(self.start), end=float(self.end))


@dataclass(eq=False)
class Prompted(Attachment):
    """One attached image prompt: the adapter, the embedding of its image (1, D), its scale and range."""

    kind: ClassVar[str] = "ip_adapter"
    record_key: ClassVar[str] = "image_prompts"
    per_step: ClassVar[bool] = True

    file: IPAdapterFile
    embedding: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    info: dict = field(default_factory=dict, repr=False)  # its record (adapter, hash, settings, reference)

    @property
    def label(self) -> str:
        return f"IP-Adapter {self.file.name!r}"

    def record(self) -> dict:
        return self.info

    @classmethod
    def inputs(cls, units, n):  # the image's tokens on the conditional rows, the zero embedding's on the others
        cond, uncond = prompt_tokens(units, n)
        return {TOKENS: cond}, {TOKENS: uncond}

    @classmethod
    def around(cls, units, network, model, timesteps):
        return ImagePrompted(network, model.unet, units, timesteps)

    @classmethod
    def a1111(cls, records, first_unit):  # sd-webui-controlnet writes IP-Adapter units as more ControlNet units
        return {f"ControlNet {first_unit + i}": ip_adapter_field(r) for i, r in enumerate(records)}

    @property
    def num_tokens(self) -> int:
        return self.file.model.config.num_tokens

    def active(self, progress: float) -> bool:
        return self.scale != 0 and self.start <= progress <= self.end

    def tokens(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) tokens for n rows each: the image's, and the zero embedding's."""
        with torch.no_grad():
            proj = self.file.model
            embedding = self.embedding.float().to(module_device(proj))  # on the adapter's device, back on the CPU
            cond = proj.tokens(embedding).cpu()
            uncond = proj.tokens(torch.zeros_like(embedding)).cpu()
        return cond.expand(n, -1, -1), uncond.expand(n, -1, -1)


def prompt_tokens(prompts: Sequence[Prompted], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every prompt's tokens side by side: (n, sum of tokens, D) for the conditional and unconditional rows."""
    pairs = [p.tokens(n) for p in prompts]
    return torch.cat([c for c, _ in pairs], dim=1), torch.cat([u for _, u in pairs], dim=1)


class ImagePrompted:
    """The UNet with image prompts attached. base: the UNet module (network may be a compiled wrapper of
    it); timesteps: the network timestep of each sampling step, for the prompts' start and end."""

    def __init__(self, network, base, prompts: Sequence[Prompted], timesteps: torch.Tensor | None = None):
        self.network, self.base, self.prompts = network, base, list(prompts)
        self.timesteps = timesteps.double() if timesteps is not None else None
        for p in self.prompts:
            check_fits(p.file.model, base, p.file.name)
        self.layers = cross_attention_layers(base)  # found once, not at every call

    def progress(self, t: torch.Tensor) -> float:
        return 0.0 if self.timesteps is None else step_progress(self.timesteps, t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        tokens = cond.pop(TOKENS, None)
        if tokens is None:
            raise ValueError(f"image prompts are attached but the call has no {TOKENS!r}")
        progress = self.progress(t)
        streams: dict = {}
        offset = 0
        for p in self.prompts:
            k = p.num_tokens
            if p.active(progress):
                streams_of = p.file.model.streams(self.base, tokens[:, offset: offset + k], p.scale, self.layers)
                for attn, items in streams_of.items():
                    streams.setdefault(attn, []).extend(items)
            offset += k
        if streams:
            cond["attention_streams"] = streams
        return self.network(x, t, **cond)


def reference(image: Image.Image) -> Image.Image:
    """The reference as it is kept and encoded: RGB, its long side at most MAX_SIDE."""
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        scale = MAX_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.LANCZOS)
    return image


def image_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())[None]


def encode_reference(file: IPAdapterFile, image: Image.Image, image_encoder: str | None = None) -> torch.Tensor:
    """The adapter's encoder's embedding of the image (1, D); a clear error when the widths differ."""
    spec = image_encoder or file.encoder
    if spec is None:
        raise ValueError(f"IP-Adapter {file.name!r} does not say which image encoder it reads: put the CLIP vision "
                         "encoder's folder beside it as image_encoder/ (diffusers' layout), or in the models "
                         "folder's clip_vision/")
    encoder = cached_image_encoder(spec)
    want = file.model.config.image_embed_dim
    if encoder.dim != want:
        raise ValueError(f"IP-Adapter {file.name!r} reads {want}-wide image embeddings, but its image encoder "
                         f"{encoder.name} gives {encoder.dim}: use the encoder it was trained with")
    return encoder.embed(image_tensor(image))


def resolve_prompts(units: Sequence[ImagePromptUnit], model, models_dir: Path | None,
                    allow_pickle: bool = False, confined: bool = False) -> list[Prompted]:
    """Each unit as a Prompted carrying its record (for the PNG), every refusal made now. ``confined``: models by
    name in the models folder (or shipped) only, never by path."""
    out = []
    for i, unit in enumerate(units):
        unit = unit.check()
        if unit.model is not None:
            shipped = {p.stem: p for p in builtin_ip_adapters()} | {p.name: p for p in builtin_ip_adapters()}
            path = shipped.get(unit.model)
            if path is None:
                try:
                    path = resolve(unit.model, models_dir, "ipadapter", confined=confined)
                except FileNotFoundError:
                    try:
                        path = resolve(unit.model, models_dir, "controlnet", confined=confined)
                    except FileNotFoundError as err:
                        raise ValueError(f"image prompt {i}: IP-Adapter {err}") from None
        else:
            path = find_ip_adapter(unit.type, models_dir, model.unet)
        file = cached_ip_adapter(path, models_dir, allow_pickle)
        check_fits(file.model, model.unet, file.name)
        image = reference(unit.image)
        embedding = encode_reference(file, image)
        record = {"model": file.name, "path": str(Path(path).resolve()), "sha256_10": file_hash(file.weights),
                  "encoder": file.encoder, "type": adapter_type(file.encoder), "scale": unit.scale,
                  "start": unit.start, "end": unit.end, "input": unit.input, "image_png": png_b64(image)}
        out.append(Prompted(file, embedding, unit.scale, unit.start, unit.end, record))
    return out





def unit_from_record(record: dict) -> ImagePromptUnit:
    """A recorded image prompt as a unit again: its reference as stored, its adapter by path (for --from)."""
    return ImagePromptUnit(from_b64(record["image_png"]), record["scale"], model=record["path"],
                           type=record.get("type", "content"), start=record.get("start", 0.0),
                           end=record.get("end", 1.0), input=record.get("input"))
