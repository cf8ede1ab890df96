"""AUTOMATIC1111's checkpoint merger on imagine's loaded models: weighted sum A (1 - M) + B M, and add
difference A + (B - C) M, tensor by tensor over the denoiser (UNet or transformer), the VAE and the text
encoders (CLIPs and T5). Models of
different architectures are refused with the mismatched tensors listed."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from imagine.adapters.lora import merge, parts_of
from imagine.io.checkpoint import CheckpointError
from imagine.io.lora_keys import is_adapter_file, load_lora
from imagine.io.stable_diffusion import save_like
from imagine.pipelines.request import load_text_model

Mode = Literal["weighted-sum", "add-difference"]


def _parts(model) -> dict[str, nn.Module]:
    parts = parts_of(model, model.text_encoder)
    t5 = getattr(model.text_encoder, "t5", None)  # SD3, Flux and PixArt read T5 too (SD3 maybe without it)
    if t5 is not None:
        parts["t5"] = t5.model
    if model.vae is not None:
        parts["vae"] = model.vae
    return parts


@torch.no_grad()
def merge_models(a, b, c=None, *, mode: Mode = "weighted-sum", multiplier: float = 0.5):
    """Merge into ``a`` in place (and return it): weighted-sum A (1 - M) + B M; add-difference A + (B - C) M."""
    if mode not in ("weighted-sum", "add-difference"):
        raise ValueError(f"merge mode {mode!r} unknown; choose weighted-sum or add-difference")
    if (mode == "add-difference") != (c is not None):
        raise ValueError("add-difference takes three models (A + (B - C) M); weighted-sum takes two")
    models = [m for m in (a, b, c) if m is not None]
    parts = [_parts(m) for m in models]
    if any(set(p) != set(parts[0]) for p in parts):
        raise CheckpointError(f"the models have different parts: {[sorted(p) for p in parts]}")
    for name in parts[0]:
        states = [p[name].state_dict() for p in parts]
        own = states[0]
        bad = sorted({k for s in states[1:] for k in set(s) ^ set(own)}
                     | {k for s in states[1:] for k in set(s) & set(own) if s[k].shape != own[k].shape})
        if bad:
            raise CheckpointError(f"the models' {name}s do not match ({len(bad)} tensors differ in name or shape: "
                                  f"{', '.join(bad[:8])}): they are not the same architecture")
        for key, value in own.items():
            if not value.is_floating_point():
                continue
            if mode == "weighted-sum":
                merged = value.float() * (1 - multiplier) + states[1][key].float() * multiplier
            else:
                merged = value.float() + (states[1][key].float() - states[2][key].float()) * multiplier
            value.copy_(merged.to(value.dtype))  # state_dict() tensors share the parameters' storage
    if a.text_encoder is not None and hasattr(a.text_encoder, "_cache"):
        a.text_encoder._cache.clear()
    return a


def merge_files(paths: list[Path], out: Path, *, mode: Mode = "weighted-sum", multiplier: float = 0.5,
                dtype: str | None = None, allow_pickle: bool = False) -> Path:
    """Load models A, B (and C), merge them and write the result to ``out`` (a .safetensors single file, or a
    folder of A's kind); ``out`` must not exist. Each model is loaded afresh (the merge changes A in place).
    B may be an adapter file (LoRA, LyCORIS, DoRA, OFT, IA3): B - A is then its update to A, so either mode
    gives A + M dW (the merger's add difference with an adapter; merge-lora at weight M)."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; a merge writes a new file or folder")
    if len(paths) not in (2, 3):
        raise ValueError(f"a merge takes two or three models, got {len(paths)}")
    if is_adapter_file(paths[1]):
        if len(paths) == 3:
            raise ValueError(f"{paths[1]} is an adapter: its difference is its own update to A, so there is no C")
        model, encoder = load_text_model(paths[0], allow_pickle=allow_pickle)
        parts = parts_of(model, encoder)
        merge(parts, [(load_lora(paths[1], parts, allow_pickle=allow_pickle), multiplier)], text_encoder=encoder)
        return save_like(model, paths[0], out, dtype)
    loaded = [load_text_model(p, allow_pickle=allow_pickle)[0] for p in paths]
    merged = merge_models(*loaded[:2], loaded[2] if len(loaded) > 2 else None, mode=mode, multiplier=multiplier)
    return save_like(merged, paths[0], out, dtype)
