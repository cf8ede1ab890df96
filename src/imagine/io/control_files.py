"""ControlNet and T2I-Adapter files, whatever their layout (STYLE rule 15: formats live at the edge).

- A diffusers folder (config.json + diffusion_pytorch_model.safetensors), which is also what imagine writes;
  its weights file alone where imagine wrote it (the config rides in the metadata).
- A single file in the original ControlNet layout that A1111's extension uses (control_v11p_sd15_canny
  .safetensors/.pth: input_blocks, input_hint_block, zero_convs, middle_block_out, optionally under
  ``control_model.``), read through a key map built from the config its shapes imply.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from imagine.io.checkpoint import CONFIG_NAME, CheckpointError, Weights, build_and_fill, open_weights, read_json
from imagine.io.ldm_keys import KeyMap, Src, read_mapped, unet_map
from imagine.io.networks import load_controlnet, load_sd3_controlnet, load_t2i_adapter
from imagine.io.stable_diffusion import unet_config_from_ldm
from imagine.models import ControlNetConfig, ControlNetModel

KINDS = {"ControlNetModel": "controlnet", "T2IAdapter": "t2i_adapter", "SD3ControlNetModel": "controlnet"}
# the denoiser architecture each class is made for (families.Family.network)
NETWORKS = {"ControlNetModel": "unet", "T2IAdapter": "unet", "SD3ControlNetModel": "mmdit"}
# words in a file name that say which condition a foreign model reads (imagine's own files record it)
_NAMED = {"canny": "canny", "scribble": "scribble", "seg": "segmentation", "segmentation": "segmentation",
          "tile": "tile", "keypoints": "keypoints"}


@dataclass
class ControlFile:
    model: torch.nn.Module  # ControlNetModel, T2IAdapter or SD3ControlNetModel
    kind: str  # "controlnet" or "t2i_adapter"
    condition: str | None  # the preprocessor it was trained on, where known
    path: Path
    info: dict  # what imagine recorded beside it (base model, steps), or {}
    network: str = "unet"  # the denoiser architecture it is made for: unet, or mmdit (an SD3 ControlNet)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


def _condition_from_name(name: str) -> str | None:
    for word in re.split(r"[^a-z]+", name.lower()):
        if word in _NAMED:
            return _NAMED[word]
    return None


def load_control(path: Path | str, *, allow_pickle: bool = False, dtype: torch.dtype = torch.float32) -> ControlFile:
    """A ControlNet or T2I-Adapter from a folder or file; anything else is refused, saying what it found."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no ControlNet or T2I-Adapter at {path}")
    raw = None
    if path.is_dir():
        if not (path / CONFIG_NAME).exists():
            raise CheckpointError(f"{path} has no {CONFIG_NAME}: not a diffusers ControlNet or T2I-Adapter folder")
        raw = read_json(path / CONFIG_NAME)
    else:
        weights, metadata = open_weights(path, allow_pickle=allow_pickle)
        if "config" in metadata:
            raw = json.loads(metadata["config"])
        elif (path.parent / CONFIG_NAME).exists() and any(k.startswith(("controlnet_", "adapter.")) for k in weights):
            raw = read_json(path.parent / CONFIG_NAME)
        else:
            return _load_original(weights, path, dtype)
    name = raw.get("_class_name") or raw.get("_class")
    kind = KINDS.get(name)
    if kind is None:
        raise CheckpointError(f"{path} holds a {name or 'model of no class'}, not a ControlNet or T2I-Adapter "
                              f"({', '.join(KINDS)})")
    load = {"ControlNetModel": load_controlnet, "T2IAdapter": load_t2i_adapter,
            "SD3ControlNetModel": load_sd3_controlnet}[name]
    info = raw.get("_imagine") or {}
    return ControlFile(load(path, dtype), kind, info.get("condition") or _condition_from_name(path.name), path, info,
                       NETWORKS[name])


def controlnet_map(keys: Iterable[str], config, prefix: str = "") -> KeyMap:
    """Our (diffusers') ControlNet keys -> the original layout: the encoder as the UNet's input blocks,
    the condition embedding as input_hint_block (convolutions at even indices, SiLU between), each zero
    convolution as zero_convs.i.0, the mid one as middle_block_out.0."""
    keys = list(keys)
    out = unet_map([k for k in keys if not k.startswith("controlnet_")], config.unet_config(), prefix)
    n_blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    for key in keys:
        p = key.split(".")
        if p[0] == "controlnet_cond_embedding":
            index = 0 if p[1] == "conv_in" else 2 * (n_blocks + 1) if p[1] == "conv_out" else 2 * (int(p[2]) + 1)
            out[key] = Src(f"{prefix}input_hint_block.{index}.{p[-1]}")
        elif p[0] == "controlnet_down_blocks":
            out[key] = Src(f"{prefix}zero_convs.{p[1]}.0.{p[2]}")
        elif p[0] == "controlnet_mid_block":
            out[key] = Src(f"{prefix}middle_block_out.0.{p[1]}")
    return out


def _load_original(weights: Weights, path: Path, dtype: torch.dtype) -> ControlFile:
    prefix = "control_model." if any(k.startswith("control_model.") for k in weights) else ""
    w = {k[len(prefix):]: r for k, r in weights.items() if k.startswith(prefix)}
    if "input_hint_block.0.weight" not in w:
        sample = ", ".join(list(weights)[:4]) or "no tensors"
        hint = ""
        if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k for k in weights):
            hint = " It looks like a LoRA: those go in models/Lora."
        elif any(k.startswith("model.diffusion_model.") for k in weights):
            hint = " It looks like a Stable Diffusion checkpoint: pass it as --model."
        elif any(k.startswith("body.") for k in weights):
            hint = " It looks like a T2I-Adapter in TencentARC's original layout: convert it to diffusers' first."
        raise CheckpointError(f"{path} is not a ControlNet or T2I-Adapter: expected a diffusers folder or the "
                              f"original layout (input_hint_block.*, zero_convs.*); found {sample}.{hint}")
    context = next((r.shape[1] for k, r in w.items() if k.endswith("attn2.to_k.weight")), 768)
    arch = "sdxl" if "label_emb.0.0.weight" in w else "sd2" if context == 1024 else "sd1"
    unet = unet_config_from_ldm(w, arch)
    hint = sorted(int(k.split(".")[1]) for k in w if k.startswith("input_hint_block.") and k.endswith(".weight"))
    convs = [w[f"input_hint_block.{i}.weight"].shape for i in hint]
    widths = (convs[0][0], *(shape[0] for shape in convs[2:-1:2]))
    config = ControlNetConfig(**{k: getattr(unet, k) for k in ControlNetConfig.__dataclass_fields__
                                 if hasattr(unet, k)}, conditioning_channels=convs[0][1],
                              conditioning_embedding_out_channels=tuple(widths))
    with torch.device("meta"):
        keys = list(ControlNetModel(config).state_dict())
    key_map = controlnet_map(keys, config)
    unused = sorted({k for k in weights if not k.startswith(prefix)} | (set(w) - {s.key for s in key_map.values()}))
    if unused:
        raise CheckpointError(f"{path} holds {len(unused)} tensors no ControlNet of its shape has: "
                              f"{', '.join(unused[:10])}")
    mapped = read_mapped(w, key_map, str(path))
    model = build_and_fill(lambda: ControlNetModel(config), mapped, str(path), dtype).eval()
    return ControlFile(model, "controlnet", _condition_from_name(path.name), path, {})
