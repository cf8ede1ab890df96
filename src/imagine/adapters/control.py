"""Spatial control attached to a UNet: ControlNets and T2I-Adapters through one mechanism (STYLE rule 13).

A request's control units become ``Conditioner``s (a loaded model, its condition image, weight, the share
of the steps it acts on, the control mode). ``Controlled`` wraps the UNet: at each call it asks every active
conditioner for residuals, sums them (multi-ControlNet and multi-adapter alike) and hands them to the UNet's
diffusers-style residual inputs. The pipeline never branches on the kind; with no active unit, or weight 0,
the UNet runs exactly as without it.

Control modes are those of sd-webui-controlnet: "balanced" adds the residuals to every row; "prompt" (My
prompt is more important) decays them layer by layer from the mid block outwards (x 0.825 per layer);
"control" (ControlNet is more important) decays them too and adds them to the conditional rows only, so
classifier-free guidance amplifies the control (diffusers' guess mode is the same idea).
"""

from __future__ import annotations

import base64
import io
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from imagine.a1111 import MODE_LABELS, MODULE_ALIASES, RESIZE_NAMES, a1111_field
from imagine.adapters.attachment import Attachment
from imagine.data.conditions import PREPROCESSORS, check_module, detect
from imagine.data.transforms import fit_image
from imagine.families import NETWORK_LABELS, of_network
from imagine.io.control_files import KINDS, ControlFile, _condition_from_name, load_control
from imagine.io.models_dir import Entry, entries, resolve
from imagine.io.png import file_hash
from imagine.models.t2i_adapter import T2IAdapterConfig

ControlMode = Literal["balanced", "prompt", "control"]
CONTROL_MODES: tuple[str, ...] = get_args(ControlMode)
SOFT_DECAY = 0.825  # sd-webui-controlnet's per-layer factor for the unbalanced modes
ROWS = "control_rows"  # the conditioning key that marks conditional (1) and unconditional (0) rows
CONDITION_KEY = "imagine-condition"  # PNG text chunk: this image already is a condition of that type





def module_name(name: str) -> str:
    """Ours, or A1111's name for the same preprocessor, as ours; anything else refused with the list."""
    return check_module(MODULE_ALIASES.get(name.lower(), name.lower()))


def available(models_dir: Path | None) -> list[tuple[str, Path]]:
    """("name [hash]", path) of every control model: the models folder's ControlNet/, then the shipped ones."""
    found = entries(models_dir, "controlnet") + [Entry(p.name, p) for p in builtin_controls()]
    return [(e.title, e.path) for e in found]


def check_mode(mode: str) -> str:
    labels = {v.lower(): k for k, v in MODE_LABELS.items()}
    mode = labels.get(str(mode).lower(), mode)
    if mode not in CONTROL_MODES:
        raise ValueError(f"control mode {mode!r} unknown; choose one of: {', '.join(CONTROL_MODES)} "
                         f"({', '.join(MODE_LABELS.values())})")
    return mode


@dataclass(eq=False)
class Conditioner(Attachment):
    """One attached unit. condition: (1, C, H, W) in [0, 1] at the output's pixel size."""

    kind: ClassVar[str] = "controlnet"  # ControlNets and T2I-Adapters, one mechanism (file.kind tells them apart)
    record_key: ClassVar[str] = "controls"
    per_step: ClassVar[bool] = True
    whole_image: ClassVar[bool] = True  # its map covers the whole image: no tiled sampling

    file: ControlFile
    condition: torch.Tensor
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    info: dict = field(default_factory=dict, repr=False)  # its record (module, model, hash, settings, map)
    _features: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"control model {self.file.name!r}"

    @property
    def made_for(self) -> str:
        return self.file.network

    def record(self) -> dict:
        return self.info

    @classmethod
    def inputs(cls, units, n):  # which rows are conditional: "ControlNet is more important" controls those alone
        return {ROWS: torch.ones(n)}, {ROWS: torch.zeros(n)}

    @classmethod
    def around(cls, units, network, model, timesteps):
        vae = model.vae

        def to_latents(condition: torch.Tensor, shift: bool = True) -> torch.Tensor:
            """The condition image's latents (the VAE's mean), which a transformer ControlNet reads; without
            ``shift``, scaled but not shifted (InstantX's SD3 ControlNets, as diffusers' pipeline feeds them)."""
            if vae is None:
                return condition * 2 - 1
            z = vae.encode(condition.to(next(vae.parameters()).dtype) * 2 - 1).mean
            return vae.to_latent(z) if shift else z * vae.config.scaling_factor

        return Controlled(network, units, timesteps, to_latents)

    @classmethod
    def a1111(cls, records, first_unit):  # as sd-webui-controlnet writes its units: "ControlNet 0"
        return {f"ControlNet {first_unit + i}": a1111_field(r) for i, r in enumerate(records)}

    def active(self, progress: float) -> bool:
        return self.weight != 0 and self.start <= progress <= self.end

    def _scales(self, n: int) -> list[float]:
        if self.mode == "balanced":
            return [self.weight] * n
        return [self.weight * SOFT_DECAY ** (n - 1 - k) for k in range(n)]

    def _rows(self, rows: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        if self.mode != "control" or rows is None:
            return None
        return rows.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def residuals(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], rows: torch.Tensor | None,
                  to_latents: Callable[..., torch.Tensor] | None = None
                  ) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        """This call's additions to the denoiser's inputs, by input name: a UNet ControlNet's down and mid
        residuals, a T2I-Adapter's intrablock features, an MMDiT ControlNet's block outputs."""
        b = x.shape[0]
        if self.file.network == "mmdit":  # SD3's: the condition's latents beside the sample, per block outputs
            # InstantX's kind (diffusers' force_zeros_for_pooled_projection) reads zeros for the pooled text and
            # unshifted latents, as diffusers' SD3 ControlNet pipeline feeds it
            instantx = self.file.model.config.force_zeros_for_pooled_projection
            if self._features is None:  # the condition is fixed: encoded once per request
                encode = to_latents or (lambda c, shift=True: c * 2 - 1)
                self._features = [encode(self.condition.to(x.device), shift=not instantx)]
            latents = self._features[0].to(x.dtype).expand(b, -1, -1, -1)
            pooled = cond["pooled_projections"]
            if instantx:
                pooled = torch.zeros_like(pooled)
            outs = self.file.model(x, t, cond["encoder_hidden_states"], pooled, latents,
                                   encoder_attention_mask=cond.get("encoder_attention_mask"))
            mask = self._rows(rows, outs[0])
            return {"block_controlnet_hidden_states": [o * s if mask is None else o * s * mask
                                                       for o, s in zip(outs, self._scales(len(outs)), strict=True)]}
        if self.file.kind == "controlnet":
            condition = self.condition.to(x.device, x.dtype).expand(b, -1, -1, -1)
            extra = {k: cond[k] for k in ("encoder_attention_mask", "class_labels", "text_embeds", "time_ids")
                     if cond.get(k) is not None}
            down, mid = self.file.model(x, t, cond.get("encoder_hidden_states"), condition, **extra)
            outs = [*down, mid]
        else:
            if self._features is None:  # the condition is fixed: the adapter runs once per request
                self._features = self.file.model(self.condition.to(x.device))
            outs = [f.to(x.dtype).expand(b, -1, -1, -1) for f in self._features]
        mask = self._rows(rows, x)
        scaled = [o * s if mask is None else o * s * mask for o, s in zip(outs, self._scales(len(outs)),
                                                                         strict=True)]
        if self.file.kind == "controlnet":
            return {"down_block_additional_residuals": scaled[:-1], "mid_block_additional_residual": scaled[-1]}
        return {"down_intrablock_additional_residuals": scaled}


def _add(total: list[torch.Tensor] | None, more: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    if more is None:
        return total
    if total is None:
        return list(more)
    if len(total) != len(more):
        raise ValueError("two units of the same kind give different numbers of residuals: they were made for "
                         "different base models")
    return [a + b for a, b in zip(total, more, strict=True)]


def step_progress(timesteps: torch.Tensor, t: torch.Tensor) -> float:
    """The share of the sampling steps done when the network is called at timestep t: the count of steps
    whose timestep lies above it (A1111's guidance start and end are fractions of the steps)."""
    now = float(torch.as_tensor(t).max())
    return float((timesteps > now + 1e-4).sum()) / len(timesteps)


class Controlled:
    """The UNet with conditioners attached: unet(x, t, **cond) plus their summed residuals.

    timesteps: the network timestep of each sampling step (the sampler's sigmas, as the denoiser converts
    them), so a call knows which share of the steps is done (A1111's guidance start and end)."""

    def __init__(self, unet, conditioners: Sequence[Conditioner], timesteps: torch.Tensor,
                 to_latents: Callable[..., torch.Tensor] | None = None):
        self.unet, self.conditioners = unet, list(conditioners)
        self.timesteps = timesteps.double()
        self.to_latents = to_latents  # pixels in [0, 1] -> the model's latents (a transformer ControlNet's input)

    def progress(self, t: torch.Tensor) -> float:
        return step_progress(self.timesteps, t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        rows = cond.pop(ROWS, None)
        progress = self.progress(t)
        extra: dict[str, Any] = {}
        for c in self.conditioners:
            if c.active(progress):
                for name, more in c.residuals(x, t, cond, rows, self.to_latents).items():
                    total = extra.get(name)
                    if isinstance(more, torch.Tensor):  # a UNet's mid residual
                        extra[name] = more if total is None else total + more
                    else:
                        extra[name] = _add(total, more)
        return self.unet(x, t, **cond, **extra)


# --- loading, with a small cache: a server reuses models across requests --------------------------------

_CACHE: OrderedDict[tuple, ControlFile] = OrderedDict()
_CACHE_SIZE = 4


def cached_control(path: Path, allow_pickle: bool = False) -> ControlFile:
    path = Path(path)
    stat = (path / "config.json" if path.is_dir() else path).stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    loaded = load_control(path, allow_pickle=allow_pickle)
    loaded.model.requires_grad_(False)
    _CACHE[key] = loaded
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return loaded


def check_fits(file: ControlFile, unet, latent_factor: int) -> None:
    """Refuse a control model made for another architecture, saying what differs."""
    cfg = unet.config
    family = of_network(unet)
    if file.network != family.network:
        raise ValueError(f"control model {file.name!r} was made for {file.network} models "
                         f"({NETWORK_LABELS.get(file.network, file.network)}); the model here is {family.label} "
                         f"({family.network}): pick one made for it")
    if file.network == "mmdit":
        c = file.model.config
        mine = (c.inner_dim, c.joint_attention_dim, c.pooled_projection_dim, c.in_channels, c.patch_size)
        theirs = (cfg.inner_dim, cfg.joint_attention_dim, cfg.pooled_projection_dim, cfg.in_channels, cfg.patch_size)
        if mine != theirs:
            raise ValueError(f"ControlNet {file.name!r} was made for another MMDiT: it has {mine}, this model needs "
                             f"{theirs} (width, text width, pooled width, latent channels, patch size)")
        return
    if file.kind == "controlnet":
        c = file.model.config
        mine = (tuple(c.block_out_channels), c.cross_attention_dim, c.layers_per_block, c.downscale)
        theirs = (tuple(cfg.block_out_channels), cfg.cross_attention_dim, cfg.layers_per_block, latent_factor)
    else:
        try:
            want = T2IAdapterConfig.for_unet(cfg, latent_factor)
        except ValueError as err:
            raise ValueError(f"T2I-Adapter {file.name!r}: {err}") from None
        c = file.model.config
        mine = (c.adapter_type, c.channels[: len(want.channels)], file.model.total_downscale_factor)
        theirs = (want.adapter_type, want.channels, want.total_downscale_factor)
    if mine != theirs:
        what = "ControlNet" if file.kind == "controlnet" else "T2I-Adapter"
        raise ValueError(f"{what} {file.name!r} was made for another base model: it has {mine}, this model needs "
                         f"{theirs} (widths, text width, layers, pixel factor)")


def condition_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())[None]


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def from_b64(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


# --- what a request asks for, and how it becomes conditioners -------------------------------------------

CONTROL_RESIZE = ("just_resize", "crop_and_resize", "resize_and_fill")
KIND_NAMES = {"controlnet": "ControlNet", "t2i_adapter": "T2I-Adapter"}


@dataclass(frozen=True)
class ControlUnit:
    """One control unit of a request, as A1111's ControlNet extension describes a unit.

    module: the preprocessor run on ``image`` (data/conditions.py; "none" when it already is a condition).
    model: a name in the models folder's ControlNet/, a path, or None: the one that reads ``module``'s
    condition and fits the base model (preferring ``kind``)."""

    module: str
    image: Image.Image | None = field(default=None, repr=False)
    model: str | None = None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    resize_mode: str = "crop_and_resize"
    processor_res: int | None = None  # the short side the preprocessor runs at (None: the output's)
    threshold_a: float | None = None
    threshold_b: float | None = None
    pixel_perfect: bool = False
    kind: str | None = None  # "controlnet" or "t2i_adapter": which kind to look for when model is None
    input: dict | None = None  # where the image came from (path and hash), for the record

    def check(self) -> ControlUnit:
        for name in ("weight", "start", "end"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
                raise ValueError(f"control unit {name} must be a finite number, got {v!r}")
        if not 0 <= self.start <= self.end <= 1:
            raise ValueError(f"control unit guidance start and end must satisfy 0 <= start <= end <= 1 (fractions "
                             f"of the steps), got {self.start} and {self.end}")
        resize = RESIZE_NAMES.get(str(self.resize_mode).lower(), self.resize_mode)
        if resize not in CONTROL_RESIZE:
            raise ValueError(f"control resize mode {self.resize_mode!r} unknown; choose one of: "
                             f"{', '.join(CONTROL_RESIZE)} (A1111: Just Resize, Crop and Resize, Resize and Fill)")
        if self.kind not in (None, "controlnet", "t2i_adapter"):
            raise ValueError(f"control kind {self.kind!r} unknown; choose controlnet or t2i_adapter")
        if self.processor_res is not None and (not isinstance(self.processor_res, int) or self.processor_res < 8):
            raise ValueError(f"processor resolution must be an integer >= 8, got {self.processor_res!r}")
        return replace(self, module=module_name(self.module), mode=check_mode(self.mode), resize_mode=resize,
                       weight=float(self.weight),
                       start=float(self.start), end=float(self.end))


def builtin_controls() -> list[Path]:
    """Control models shipped with imagine (weights/control/NAME), for the shipped base model."""
    root = Path(__file__).resolve().parent.parent / "weights" / "control"
    return sorted(p for p in root.iterdir() if (p / "config.json").exists()) if root.is_dir() else []


def _peek(path: Path) -> dict:
    """A control model's config without loading its weights (folders, or files imagine wrote)."""
    try:
        if path.is_dir():
            return json.loads((path / "config.json").read_text())
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return json.loads((f.metadata() or {}).get("config", "{}"))
    except (OSError, ValueError):
        return {}
    return {}


def _fits_config(raw: dict, unet_cfg) -> bool | None:
    if raw.get("_class_name") == "SD3ControlNetModel":
        return getattr(unet_cfg, "inner_dim", None) == raw.get("num_attention_heads", 0) * raw.get(
            "attention_head_dim", 0) and raw.get("joint_attention_dim") == getattr(unet_cfg, "joint_attention_dim", -1)
    if not hasattr(unet_cfg, "block_out_channels"):  # a transformer: the UNet kinds do not fit it
        return False
    if raw.get("_class_name") == "ControlNetModel":
        return (tuple(raw.get("block_out_channels", ())) == tuple(unet_cfg.block_out_channels)
                and raw.get("cross_attention_dim") == unet_cfg.cross_attention_dim)
    if raw.get("_class_name") == "T2IAdapter":
        return tuple(raw.get("channels", ()))[:2] == tuple(unet_cfg.block_out_channels)[:2]
    return None  # unknown until loaded


def control_models(models_dir: Path | None) -> list[tuple[Path, dict, str | None]]:
    """Every control model a request may use, the models folder's ControlNet/ first, then the shipped ones:
    (path, its config, the condition it reads, from its config or its name)."""
    out = []
    for path in [e.path for e in entries(models_dir, "controlnet")] + builtin_controls():
        raw = _peek(path)
        out.append((path, raw, (raw.get("_imagine") or {}).get("condition") or _condition_from_name(path.name)))
    return out


def find_control(module: str, kind: str | None, models_dir: Path | None, unet) -> Path:
    """The control model for ``module``'s condition: in the models folder's ControlNet/ first, then the
    shipped ones; one that fits the base model, of ``kind`` where asked."""
    seen = []
    for path, raw, condition in control_models(models_dir):
        found_kind = KINDS.get(raw.get("_class_name"))
        seen.append(f"{path.name} ({condition or '?'})")
        if condition != module or (kind is not None and found_kind not in (None, kind)):
            continue
        if _fits_config(raw, unet.config) is False:
            continue
        return path
    what = KIND_NAMES.get(kind or "", "ControlNet or T2I-Adapter")
    raise ValueError(f"no {what} for {module!r} conditions that fits this model (looked in "
                     f"{Path(models_dir) / 'ControlNet' if models_dir else 'no models folder'} and the shipped ones: "
                     f"{', '.join(seen) or 'none'}); train one with `imagine train-controlnet --condition {module}` "
                     f"or name one: --control {module}@NAME:IMAGE")


def prepare_condition(unit: ControlUnit, size: tuple[int, int]) -> Image.Image:
    """The unit's condition map at ``size`` (width, height): its preprocessor run at the processor
    resolution (skipped when the image already is such a condition), fitted by its resize mode."""
    if unit.image is None:
        raise ValueError(f"control unit {unit.module!r} has no image")
    image = unit.image.convert("RGB")
    if unit.module != "none" and unit.image.info.get(CONDITION_KEY) != unit.module:
        res = min(size) if unit.pixel_perfect or unit.processor_res is None else unit.processor_res
        image = Image.fromarray(detect(unit.module, image, res, unit.threshold_a, unit.threshold_b))
    return fit_image(image, size, unit.resize_mode)


def resolve_units(units: Sequence[ControlUnit], model, size: tuple[int, int], models_dir: Path | None,
                  allow_pickle: bool = False, confined: bool = False) -> list[Conditioner]:
    """Each unit as a Conditioner carrying its record (for the PNG), every refusal made now. ``confined``: models
    by name in the models folder (or shipped) only, never by path."""
    out = []
    for i, unit in enumerate(units):
        unit = unit.check()
        if unit.model is not None:
            shipped = {p.name: p for p in builtin_controls()}
            try:
                path = shipped.get(unit.model) or resolve(unit.model, models_dir, "controlnet", confined=confined)
            except FileNotFoundError as err:
                raise ValueError(f"control unit {i}: {err}") from None
        else:
            path = find_control(unit.module, unit.kind, models_dir, model.unet)
        file = cached_control(path, allow_pickle=allow_pickle)
        check_fits(file, model.unet, model.latent_factor)
        condition = prepare_condition(unit, size)
        weights = path if path.is_file() else path / "diffusion_pytorch_model.safetensors"

        pre = PREPROCESSORS[unit.module]
        defaults = [d[1] if d is not None else None for d in (pre.threshold_a, pre.threshold_b)]
        threshold_a = unit.threshold_a if unit.threshold_a is not None else defaults[0]
        threshold_b = unit.threshold_b if unit.threshold_b is not None else defaults[1]
        record = {"module": unit.module, "model": file.name, "path": str(path.resolve()), "kind": file.kind,
                  "sha256_10": file_hash(weights) if weights.is_file() else None, "weight": unit.weight,
                  "start": unit.start, "end": unit.end, "mode": unit.mode, "resize_mode": unit.resize_mode,
                  "processor_res": unit.processor_res or min(size), "threshold_a": threshold_a,
                  "threshold_b": threshold_b, "pixel_perfect": unit.pixel_perfect, "input": unit.input,
                  "condition_png": png_b64(condition)}
        out.append(Conditioner(file, condition_tensor(condition), unit.weight, unit.start, unit.end, unit.mode,
                               record))
    return out





def unit_from_record(record: dict) -> ControlUnit:
    """A recorded unit as a unit again: its condition map as stored, its model by path (for --from)."""
    image = from_b64(record["condition_png"])
    image.info[CONDITION_KEY] = record["module"]  # already that condition: not preprocessed again
    return ControlUnit(record["module"], image, model=record["path"], weight=record["weight"], start=record["start"],
                       end=record["end"], mode=record["mode"], resize_mode="just_resize",
                       processor_res=record.get("processor_res"), threshold_a=record.get("threshold_a"),
                       threshold_b=record.get("threshold_b"), pixel_perfect=record.get("pixel_perfect", False),
                       input=record.get("input"))
