"""Loaders and savers of the model architectures: ours (config.json + model.safetensors) and diffusers' folders
(config.json + diffusion_pytorch_model.safetensors), both strict about keys."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagine import __version__
from imagine.io.checkpoint import (
    CONFIG_NAME,
    DTYPES,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_save_safetensors,
    build_and_fill,
    fresh_folder,
    load_state_strict,
    open_weights,
    read_json,
    read_pickle_weights_only,
    read_safetensors,
    save_model,
)
from imagine.models.autoencoder import AutoencoderKL, VAEConfig
from imagine.models.clip import CLIPConfig, ShapesCLIP
from imagine.models.controlnet import ControlNetConfig, ControlNetModel
from imagine.models.dit import DiTConfig, DiTTransformer2DModel
from imagine.models.flux import FluxConfig, FluxTransformer2DModel
from imagine.models.image_encoders import BUILTIN, CLIPVisionEncoder, FunctionEncoder, ShapesTowerEncoder
from imagine.models.inception import FIDInceptionV3
from imagine.models.mmdit import MMDiTConfig, MMDiTControlNetConfig, SD3ControlNetModel, SD3Transformer2DModel
from imagine.models.pixart import PixArtConfig, PixArtTransformer2DModel
from imagine.models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from imagine.models.unet import UNet2DConditionModel, UNetConfig
from imagine.weights import DEFAULT_CLIP, default_clip

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# diffusers config keys that imagine's UNet implements only at these values; anything else is refused.
_UNET_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "dual_cross_attention": False,
    "only_cross_attention": False, "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
    "class_embed_type": None, "mid_block_scale_factor": 1,
    "conv_in_kernel": 3, "conv_out_kernel": 3,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "timestep_post_act": None,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_dim": None,
    "time_embedding_act_fn": None, "cross_attention_norm": None, "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "reverse_transformer_layers_per_block": None, "attention_type": "default", "attention_bias": False,
}
# keys that change nothing for imagine (bookkeeping, or fp16 upcasting that SDPA makes unnecessary)
_UNET_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "upcast_attention", "_use_default_values"}
# a ControlNet's copy takes the UNet's settings; its condition is RGB (a BGR one is refused, not flipped)
_CONTROLNET_FIXED = {**_UNET_FIXED, "controlnet_conditioning_channel_order": "rgb"}
_CONTROL_IGNORED = {*_UNET_IGNORED, "_imagine"}
_VAE_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
_VAE_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "force_upcast", "_use_default_values"}


def _from_diffusers(config: dict[str, Any], cls, fixed: dict[str, Any], ignored: set[str], what: str):
    """Map a diffusers config onto ours: shared keys carry over, fixed keys must hold their one supported
    value, bookkeeping keys are dropped, and anything else is refused by name (never silently ignored)."""
    known = {f.name for f in fields(cls)}
    ours, unsupported = {}, []
    for key, value in config.items():
        if key in known:
            ours[key] = tuple(value) if isinstance(value, list) else value
        elif key not in ignored and not (key in fixed and value == fixed[key]):
            unsupported.append(f"{key}={value!r}")
    if what == "VAE" and ours.get("shift_factor") is None:
        ours["shift_factor"] = 0.0
    if unsupported:
        raise CheckpointError(f"this diffusers {what} uses settings imagine does not implement: "
                              + ", ".join(sorted(unsupported)))
    try:
        return cls(**ours)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"this diffusers {what} config is not one imagine supports: {err}") from err


def diffusers_config(model: nn.Module) -> dict[str, Any]:
    """The config diffusers' UNet2DConditionModel or AutoencoderKL needs to hold this model's weights: our
    keys are theirs, and every setting we leave out is at diffusers' default (the _FIXED values)."""
    config = _config_of(model)
    if isinstance(model, UNet2DConditionModel):
        if model.config.efficient:
            raise ValueError("this UNet uses Efficient U-Net options (scaled skips, downsample-first) that "
                             "diffusers' UNet2DConditionModel lacks; it has no diffusers layout")
        del config["skip_scale"], config["downsample_first"]
        if config.pop("learned_variance"):
            config["out_channels"] *= 2  # diffusers has no flag: the variance is just more output channels
        return config
    if isinstance(model, AutoencoderKL):
        n = len(config["block_out_channels"])
        config["down_block_types"] = config["down_block_types"] or ["DownEncoderBlock2D"] * n
        config["up_block_types"] = config["up_block_types"] or ["UpDecoderBlock2D"] * n
        return config
    raise TypeError(f"no diffusers counterpart for {type(model).__name__}")


def _config_of(model: nn.Module) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.config).items()}


def save_unet(unet: nn.Module, folder: Path, dtype: str | None = None) -> Path:
    """A model's denoiser network (a UNet or a diffusion transformer), under its class name."""
    return save_model(unet, _config_of(unet), folder, type(unet).__name__, dtype)


def save_vae(vae: AutoencoderKL, folder: Path, dtype: str | None = None) -> Path:
    return save_model(vae, _config_of(vae), folder, "AutoencoderKL", dtype)


def _load(path: Path, kind: str, cls, config_cls, fixed, ignored, what: str, dtype: torch.dtype = torch.float32):
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no {what} at {path}")
    if path.is_file():
        folder, weights_file = path.parent, path
    else:
        folder = path
        candidates = [path / WEIGHTS_NAME, *(path / name for name in DIFFUSERS_WEIGHTS)]
        weights_file = next((c for c in candidates if c.exists()), None)
        if weights_file is None:
            found = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else []
            raise CheckpointError(f"{path} holds no {what} weights: expected {WEIGHTS_NAME} (imagine) or "
                                  f"{DIFFUSERS_WEIGHTS[0]} (diffusers); found {found or 'nothing'}")
    weights, metadata = open_weights(weights_file, allow_pickle=weights_file.suffix == ".bin")
    config_path = folder / CONFIG_NAME
    if "config" in metadata:
        raw = json.loads(metadata["config"])
    elif config_path.exists():
        raw = read_json(config_path)
    else:
        raise CheckpointError(f"{weights_file} has no config in its metadata and no {CONFIG_NAME} beside it")
    if raw.get("_class") is not None:  # ours
        if raw["_class"] != kind:
            raise CheckpointError(f"{path} holds a {raw['_class']}, not a {kind}")
        config = config_cls.from_dict({k: v for k, v in raw.items() if not k.startswith("_")})
    else:
        if raw.get("_class_name") not in (None, kind):
            raise CheckpointError(f"{path} holds a diffusers {raw.get('_class_name')}, not a {kind}")
        config = _from_diffusers(raw, config_cls, fixed, ignored, what)
    return build_and_fill(lambda: cls(config), weights, str(weights_file), dtype).eval()


def save_clip(model: ShapesCLIP, folder: Path, dtype: str | None = None) -> Path:
    return save_model(model, _config_of(model), folder, "ShapesCLIP", dtype)


def load_clip(path: Path | str) -> ShapesCLIP:
    """A ShapesCLIP folder written by save_clip (``imagine train-clip``); missing or unexpected keys fail."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.exists():
        raise CheckpointError(f"no CLIP model at {path} (expected {WEIGHTS_NAME})")
    state, metadata = read_safetensors(weights)
    raw = json.loads(metadata["config"]) if "config" in metadata else read_json(weights.parent / CONFIG_NAME)
    if raw.get("_class") != "ShapesCLIP":
        raise CheckpointError(f"{path} holds a {raw.get('_class') or 'foreign model'}, not a ShapesCLIP")
    model = ShapesCLIP(CLIPConfig.from_dict({k: v for k, v in raw.items() if not k.startswith("_")}))
    load_state_strict(model, {k: v.float() for k, v in state.items()}, str(weights))
    return model.eval()


# The denoiser networks a model folder may hold: class name -> (class, config, fixed diffusers keys, ignored keys)
_DIT_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
DENOISERS: dict[str, tuple] = {
    "UNet2DConditionModel": (UNet2DConditionModel, UNetConfig, _UNET_FIXED, _UNET_IGNORED),
    "DiTTransformer2DModel": (DiTTransformer2DModel, DiTConfig, {}, _DIT_IGNORED),
    "PixArtTransformer2DModel": (PixArtTransformer2DModel, PixArtConfig, {}, _DIT_IGNORED),
    "SD3Transformer2DModel": (SD3Transformer2DModel, MMDiTConfig, {}, _DIT_IGNORED),
    "FluxTransformer2DModel": (FluxTransformer2DModel, FluxConfig, {}, _DIT_IGNORED),
}


def denoiser_class(path: Path | str) -> str:
    """The class name a network folder (or weights file) declares: ours (_class) or diffusers' (_class_name);
    a config that names neither is a UNet (diffusers' older files)."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    raw = {}
    if path.is_file() and path.suffix == ".safetensors":
        raw = json.loads(open_weights(path, allow_pickle=False)[1].get("config", "{}"))
    elif (folder / CONFIG_NAME).exists():
        raw = read_json(folder / CONFIG_NAME)
    return raw.get("_class") or raw.get("_class_name") or "UNet2DConditionModel"


def load_unet(path: Path | str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model's denoiser network, a UNet or a diffusion transformer (DiT), from our folder or file or a
    diffusers folder; missing or unexpected keys fail. Weights are read one tensor at a time into ``dtype``
    (memory: the model, never a second copy)."""
    kind = denoiser_class(path) if Path(path).exists() else "UNet2DConditionModel"
    if kind not in DENOISERS:
        raise CheckpointError(f"{path} holds a {kind}; imagine's model folders hold one of: {', '.join(DENOISERS)}")
    cls, config_cls, fixed, ignored = DENOISERS[kind]
    return _load(Path(path), kind, cls, config_cls, fixed, ignored, "UNet" if kind.startswith("UNet") else kind,
                 dtype)


def load_controlnet(path: Path | str, dtype: torch.dtype = torch.float32) -> ControlNetModel:
    """A ControlNet from a diffusers ControlNetModel folder (ours are written in that layout) or its weights
    file with the config in its metadata; missing or unexpected keys fail."""
    return _load(Path(path), "ControlNetModel", ControlNetModel, ControlNetConfig, _CONTROLNET_FIXED,
                 _CONTROL_IGNORED, "ControlNet", dtype)


def load_sd3_controlnet(path: Path | str, dtype: torch.dtype = torch.float32) -> SD3ControlNetModel:
    """An SD3 ControlNet (diffusers' SD3ControlNetModel: InstantX's, Stability's, ours) from its folder or
    weights file; missing or unexpected keys fail."""
    return _load(Path(path), "SD3ControlNetModel", SD3ControlNetModel, MMDiTControlNetConfig, {},
                 {*_DIT_IGNORED, "_imagine"}, "SD3 ControlNet", dtype)


def load_t2i_adapter(path: Path | str, dtype: torch.dtype = torch.float32) -> T2IAdapter:
    """A T2I-Adapter from a diffusers T2IAdapter folder (ours are written in that layout)."""
    return _load(Path(path), "T2IAdapter", T2IAdapter, T2IAdapterConfig, {}, _CONTROL_IGNORED, "T2I-Adapter", dtype)


def save_diffusers_model(model: nn.Module, folder: Path, class_name: str, imagine: dict[str, Any] | None = None,
                         dtype: str | None = None) -> Path:
    """``folder`` in diffusers' layout (config.json with _class_name, diffusion_pytorch_model.safetensors,
    the config also in the file's metadata so the file alone describes itself), written whole or not at
    all; ``imagine``: what diffusers does not know (the condition, the base model), kept under "_imagine",
    a key diffusers ignores."""
    config = {"_class_name": class_name, "_diffusers_version": "0.30.0",
              "_imagine": {"version": __version__, **(imagine or {})}, **_config_of(model)}
    state = model.state_dict()
    if dtype is not None:
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    with fresh_folder(Path(folder)) as tmp:
        atomic_save_safetensors(state, tmp / DIFFUSERS_WEIGHTS[0], {"config": json.dumps(config), "format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return Path(folder)


def load_vae(path: Path | str) -> AutoencoderKL:
    """A VAE from our folder or file, or a diffusers AutoencoderKL folder; missing or unexpected keys fail."""
    return _load(Path(path), "AutoencoderKL", AutoencoderKL, VAEConfig, _VAE_FIXED, _VAE_IGNORED, "VAE")


__all__ = [
    "AutoencoderKL",
    "CLIPConfig",
    "CheckpointError",
    "ControlNetConfig",
    "ControlNetModel",
    "FIDInceptionV3",
    "ShapesCLIP",
    "T2IAdapter",
    "T2IAdapterConfig",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "load_clip",
    "load_controlnet",
    "load_fid_inception",
    "load_t2i_adapter",
    "load_unet",
    "load_vae",
    "save_clip",
    "save_diffusers_model",
    "save_unet",
    "save_vae",
]


# the 1008-way classifier head is in the file but plays no part in pool features
_UNUSED = ("fc.weight", "fc.bias")


def load_fid_inception(path: Path) -> FIDInceptionV3:
    """Load pytorch-fid's (or torch-fidelity's) FID Inception weights from a local file, strictly: every
    weight of the network must be there with its shape; anything but the unused head is refused. Pickled
    files are read with ``weights_only=True``; .safetensors files are read as they are."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Inception weight file at {path}: pass the path of pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth")
    state = read_safetensors(path)[0] if path.suffix == ".safetensors" else read_pickle_weights_only(path)
    state = {k: v for k, v in state.items() if k not in _UNUSED}
    model = FIDInceptionV3()
    for key, counter in model.state_dict().items():  # older files lack batch norm's counters; they are unused
        if key.endswith(".num_batches_tracked"):
            state.setdefault(key, counter)
    load_state_strict(model, state, f"{path} (expected pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    return model.requires_grad_(False).eval()


def load_image_encoder(spec: str | Path | None):
    """An encoder by name (shapes-clip, palette, intensity) or folder (a ShapesCLIP from ``imagine train-clip``
    or a transformers CLIPVisionModelWithProjection). None: the shipped scorer's tower."""
    if spec is None or str(spec) == "shapes-clip":
        return ShapesTowerEncoder(load_clip(default_clip()), "shapes-clip")
    if str(spec) in ("palette", "intensity"):
        return FunctionEncoder(str(spec))
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"image encoder {spec!r} is neither one of {', '.join(BUILTIN)} nor a folder")
    config = path / "config.json" if path.is_dir() else None
    raw = json.loads(config.read_text()) if config is not None and config.is_file() else {}
    if raw.get("_class") == "ShapesCLIP" or (path.is_file() and path.suffix == ".safetensors"):
        same = path.resolve() == DEFAULT_CLIP.resolve()
        return ShapesTowerEncoder(load_clip(path), "shapes-clip" if same else str(path))
    if "CLIPVisionModelWithProjection" in raw.get("architectures", ()) or raw.get("model_type") in (
            "clip_vision_model", "clip"):
        return CLIPVisionEncoder(path)
    raise ValueError(f"{path} is not an image encoder imagine reads: expected a ShapesCLIP folder (imagine "
                     "train-clip) or a transformers CLIPVisionModelWithProjection folder (config.json with "
                     f"that architecture); found {raw.get('architectures') or raw.get('_class') or 'no config'}")


_ENCODERS: dict[str, object] = {}


def cached_image_encoder(spec: str | Path | None):
    key = str(spec)
    if key not in _ENCODERS:
        if len(_ENCODERS) >= 4:
            _ENCODERS.pop(next(iter(_ENCODERS)))
        _ENCODERS[key] = load_image_encoder(spec)
    return _ENCODERS[key]
