"""LoRA adapters over a model's parts (STYLE rule 13: one way to attach, one to detach).

A ``LoRA`` is a set of ``LoRALayer``s keyed by the module each one updates, as "PART.MODULE" with PART
one of ``unet``, ``text_encoder``, ``text_encoder_2`` and MODULE the module's name in that part (ours,
i.e. diffusers' and transformers' names). ``attach`` adds each update to its module's output through a
forward hook, scaled by a weight: several LoRAs add; weight 0 attaches nothing (the base model's pixels,
bit for bit); ``detach`` removes the hooks and leaves the model as it was. ``merge`` folds the updates
into the weights instead (no cost per step). A LoRA key that matches no module, or a shape that does not
fit, is an error listing what did not match (a LoRA must never silently do nothing)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from imagine.adapters.attachment import Attachment
from imagine.io.checkpoint import CheckpointError
from imagine.io.lora_keys import load_lora
from imagine.io.png import file_hash
from imagine.nn.lora import LoRA, LoRALayer, WeightDelta, find_module

PARTS = ("unet", "text_encoder", "text_encoder_2")
# which UNet layers a LoRA trains: attention projections (the paper's choice), plus the feed-forward, or
# every linear and conv layer of the transformer blocks and resnets (kohya's "LoCon")
TARGETS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn+ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def parts_of(model, text_encoder=None) -> dict[str, nn.Module]:
    """The modules a LoRA may attach to: the UNet and the text encoder's transformer(s)."""
    parts = {"unet": model.unet}
    if text_encoder is not None:
        if hasattr(text_encoder, "model_2"):
            parts.update(text_encoder=text_encoder.model_1, text_encoder_2=text_encoder.model_2)
        elif hasattr(text_encoder, "model"):
            parts["text_encoder"] = text_encoder.model
    return parts


def _chosen(part: str, name: str, targets: str) -> bool:
    if part != "unet":
        return name.endswith(TEXT_TARGETS)
    if targets == "all":  # every linear and conv of the blocks but the skip 1x1s and time projections
        return name.startswith(("down_blocks", "mid_block", "up_blocks")) and not name.endswith(
            ("conv_shortcut", "time_emb_proj"))
    return name.endswith(TARGETS[targets])


ALGOS = ("lora", "locon", "loha", "lokr", "dora")  # what train-lora --algo trains (locon: LoRA on every layer)


def create(parts: dict[str, nn.Module], rank: int, alpha: float | None = None, targets: str = "attn",
           text_encoder: bool = False, seed: int = 0, algo: str = "lora") -> LoRA:
    """A new adapter that starts at nothing on the UNet's ``targets`` layers ("attn", "attn+ff" or "all"), and on
    the text encoders' attention projections with ``text_encoder``: LoRA (B = 0), or LyCORIS's LoHa or LoKr, or
    DoRA (nn/lora.WeightDelta.new). ``algo`` locon is LoRA on every linear and conv layer (targets all)."""
    if algo not in ALGOS:
        raise ValueError(f"adapter algorithm {algo!r} unknown; choose {', '.join(ALGOS)}")
    if algo == "locon":
        algo, targets = "lora", "all"
    if targets not in (*TARGETS, "all"):
        raise ValueError(f"LoRA targets {targets!r} unknown; choose attn, attn+ff or all")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        lora = LoRA()
        for part_name, part in parts.items():
            if part_name != "unet" and not text_encoder:
                continue
            for name, module in part.named_modules():
                if not isinstance(module, (nn.Linear, nn.Conv2d)):
                    continue
                if _chosen(part_name, name, targets):
                    layer = LoRALayer(module, rank, alpha) if algo == "lora" else WeightDelta.new(
                        algo, module, rank, alpha)
                    lora.layers[f"{part_name}.{name}"] = layer.to(module.weight.device)
    finally:
        torch.random.set_rng_state(generator_state)
    if not lora.layers:
        raise ValueError(f"no {targets} layers to put a LoRA on in {sorted(parts)}")
    return lora


def check(parts: dict[str, nn.Module], lora: LoRA, strict: bool = True) -> dict[str, nn.Module]:
    """Each LoRA key's module, checked: a key that matches no module or whose shapes do not fit is an error
    listing them (``strict=False``: a warning with the same list, and those keys are left out)."""
    found, unmatched, misfit = {}, [], []
    for key, layer in lora.layers.items():
        part_name, _, module_name = key.partition(".")
        part = parts.get(part_name)
        module = find_module(part, module_name) if part is not None else None
        if module is None:
            unmatched.append(key)
            continue
        if isinstance(layer, WeightDelta):  # LoHa, LoKr, full, DoRA: the update it makes must be the weight's shape
            why = layer.expected(module)
            if why is not None:
                misfit.append(f"{key}: {why}")
                continue
            found[key] = module
            continue
        base = LoRALayer(module, layer.rank)  # the shapes an update of this module must have
        if base.down.weight.shape != layer.down.weight.shape or base.up.weight.shape != layer.up.weight.shape:
            misfit.append(f"{key}: down {tuple(layer.down.weight.shape)}, up {tuple(layer.up.weight.shape)} vs "
                          f"the module's {tuple(module.weight.shape)}")
            continue
        found[key] = module
    if unmatched or misfit:
        def show(items):
            return ", ".join(items[:8]) + (f" (and {len(items) - 8} more)" if len(items) > 8 else "")

        message = (f"LoRA {lora.name!r}: {len(found)} of {len(lora.layers)} layers fit this model"
                   + (f"; {len(unmatched)} match no module: {show(unmatched)}" if unmatched else "")
                   + (f"; {len(misfit)} do not fit: {show(misfit)}" if misfit else "")
                   + ". Is it for another architecture?")
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, stacklevel=2)
    return found


@dataclass
class Attached:
    """What ``attach`` did; ``detach()`` undoes it exactly."""

    handles: list = field(default_factory=list)
    text_encoder: object = None

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        forget_text_cache(self.text_encoder)


def forget_text_cache(text_encoder) -> None:
    cache = getattr(text_encoder, "_cache", None)
    if cache is not None:  # cached prompt embeddings were made without (or with) the text encoder's LoRA
        cache.clear()


def attach(parts: dict[str, nn.Module], loras: list[tuple[LoRA, float]], *, strict: bool = True,
           text_encoder=None) -> Attached:
    """Add each LoRA's update, times its weight, to its modules' outputs. Weight 0 adds nothing."""
    attached = Attached(text_encoder=text_encoder)
    for lora, weight in loras:
        modules = check(parts, lora, strict)
        if weight == 0:
            continue
        for key, module in modules.items():
            layer = lora.layers[key].to(module.weight.device)  # beside the weight it updates, on any device

            def hook(mod, args, output, layer=layer, weight=float(weight)):
                update = layer(args[0], mod) if isinstance(layer, WeightDelta) else layer(args[0])
                return output + (update * weight).to(output.dtype)

            attached.handles.append(module.register_forward_hook(hook))
    if any(key.split(".", 1)[0] != "unet" for lora, w in loras if w for key in lora.layers):
        forget_text_cache(text_encoder)
    return attached


@torch.no_grad()
def merge(parts: dict[str, nn.Module], loras: list[tuple[LoRA, float]], *, strict: bool = True,
          text_encoder=None) -> None:
    """Fold weight x each update into its module's weight, in place: W <- W + w (alpha / r) B A."""
    for lora, weight in loras:
        for key, module in check(parts, lora, strict).items():
            if weight:
                layer = lora.layers[key].to(module.weight.device)
                delta = (layer.delta_weight(module.weight.detach()) if isinstance(layer, WeightDelta)
                         else layer.delta_weight()).to(torch.float32) * weight
                module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
                bias = layer.delta_bias(module) if isinstance(layer, WeightDelta) else None
                if bias is not None and module.bias is not None:  # a full diff moves the bias too
                    module.bias.copy_((module.bias.float() + bias.float() * weight).to(module.bias.dtype))
    forget_text_cache(text_encoder)


@dataclass(frozen=True)
class LoraUse(Attachment):
    """A LoRA a request attached: found as a file, loaded and checked against the model when attached."""

    kind: ClassVar[str] = "lora"
    record_key: ClassVar[str] = "loras"

    name: str  # as asked (a name in Lora/ or a path)
    path: Path
    weight: float
    source: str  # "option" (--lora, the job API) or "prompt" (a <lora:NAME:W> tag)
    strict: bool = True  # False: keys that match no module are a warning, not an error

    @property
    def label(self) -> str:
        return f"LoRA {self.name!r}"

    def record(self) -> dict[str, Any]:
        stem = self.path.stem if self.path.is_file() else self.path.name
        return {"name": stem, "path": str(self.path.resolve()), "weight": self.weight, "source": self.source,
                "sha256_10": file_hash(self.path) if self.path.is_file() else None}

    @classmethod
    def attach(cls, units, model, text_encoder):
        parts = parts_of(model, text_encoder)  # (asked for only now: a text encoder loads its model on first use)
        loaded = [(load_lora(use.path, parts), use.weight) for use in units]
        return attach(parts, loaded, text_encoder=text_encoder, strict=all(use.strict for use in units)).detach

    @classmethod
    def a1111(cls, records, first_unit):
        # A1111's form: "name: hash, name: hash" (the weights are in the prompt's tags or the record)
        return {"Lora hashes": ", ".join(f"{lo['name']}: {lo['sha256_10']}" for lo in records)}
