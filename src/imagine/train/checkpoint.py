"""Full training state on disk, written atomically.

A checkpoint is a folder ``checkpoints/step_0000500/`` holding the model (``model/``), its EMA (``ema/``) and
``training_state.safetensors`` (optimizer tensors; step, optimizer hyper-parameters, LR schedule, RNG and
the training config in its metadata). It is written under a temporary name and renamed into place, and
only then does ``checkpoints/latest`` (itself replaced atomically) point at it. A run killed at any
moment leaves the previous checkpoint intact and ``latest`` pointing at a complete folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from imagine.io.checkpoint import (
    CheckpointError,
    atomic_save_safetensors,
    atomic_write_bytes,
    read_json,
    read_safetensors,
)
from imagine.io.model_folder import (
    SPEC_NAME,
    VOCABULARY_NAME,
    DiffusionModel,
    DiffusionSpec,
    load_model_folder,
    load_vocabulary,
    save_model_folder,
)
from imagine.io.networks import load_unet, load_vae, save_unet, save_vae
from imagine.models import AutoencoderKL
from imagine.train.ema import EMA

STATE_NAME = "training_state.safetensors"


def _io(model) -> tuple:
    """(save, load) for the model's kind: checkpoints hold UNets or VAEs in their own formats."""
    return (save_vae, load_vae) if isinstance(model, AutoencoderKL) else (save_unet, load_unet)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(root: Path, step: int, unet, ema: EMA | None, optimizer, lr_scheduler, extra: dict[str, Any],
                    keep: int = 2) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_folder(root, step)
    name = final.name
    tmp = root / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    save, _ = _io(unet)
    save(unet, tmp / "model")
    if ema is not None:
        save(ema.model, tmp / "ema")
    tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "optimizer": optim_meta, "lr_scheduler": lr_scheduler.state_dict(),
            "ema_updates": ema.updates if ema is not None else 0, **extra}
    atomic_save_safetensors(tensors, tmp / STATE_NAME, {"state": json.dumps(meta)})
    if final.exists():  # a re-run of the same step (after a resume): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_bytes(root / "latest", name.encode())
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_folder(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``root`` (written or not)."""
    return Path(root) / f"step_{step:07d}"


def checkpoint_steps(root: Path) -> list[int]:
    """The steps of the complete checkpoints kept under ``root``, in order."""
    root = Path(root)
    return sorted(checkpoint_step(p) for p in root.glob("step_*") if (p / STATE_NAME).exists()) \
        if root.is_dir() else []


def latest_checkpoint(root: Path) -> Path | None:
    pointer = Path(root) / "latest"
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / STATE_NAME).exists():
        raise CheckpointError(f"{pointer} points at {path}, which is incomplete; delete it to start over")
    return path


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder was written at (its name: step_0001500)."""
    name = Path(path).name
    if not name.startswith("step_") or not name[5:].isdigit():
        raise CheckpointError(f"{path} is not a checkpoint folder (step_NNNNNNN)")
    return int(name[5:])


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's metadata (step, configs, where the run started) without loading its tensors."""
    with safe_open(str(Path(path) / STATE_NAME), "pt") as f:
        return json.loads(f.metadata()["state"])


def load_checkpoint(path: Path, unet, ema: EMA | None, optimizer, lr_scheduler) -> dict[str, Any]:
    """Restore everything in place; returns the metadata (step, data position, config...)."""
    path = Path(path)
    tensors, metadata = read_safetensors(path / STATE_NAME)
    meta = json.loads(metadata["state"])
    _, load = _io(unet)
    unet.load_state_dict(load(path / "model").state_dict())
    if ema is not None:
        ema.model.load_state_dict(load(path / "ema").state_dict())
        ema.updates = meta["ema_updates"]
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta


def checkpoint_model(run: Path | str, step: int) -> DiffusionModel:
    """The model a training run held at checkpoint ``step``: that checkpoint's EMA weights, with the run's
    spec and VAE (both written when the run starts)."""
    run = Path(run)
    if not (run / SPEC_NAME).exists():
        raise CheckpointError(f"{run} is not a training run (no {SPEC_NAME})")
    folder = checkpoint_folder(run / "checkpoints", step)
    if step not in checkpoint_steps(run / "checkpoints"):
        raise CheckpointError(f"{run} has no checkpoint at step {step}; it keeps "
                              f"{', '.join(map(str, checkpoint_steps(run / 'checkpoints'))) or 'none'}")
    spec = DiffusionSpec.from_dict(read_json(run / SPEC_NAME))
    if spec.latent and not (run / "vae").is_dir():
        raise CheckpointError(f"{run} has no vae/ beside its checkpoints (earlier versions wrote it only at the "
                              f"end): copy the VAE folder it trained with to {run / 'vae'}")
    return DiffusionModel(load_unet(folder / "ema"), load_vae(run / "vae") if spec.latent else None, spec, run,
                          vocabulary=load_vocabulary(run))


def export_model(model: Path | str, out: Path | str, dtype: str = "fp16", step: int | None = None) -> int:
    """Copy a model folder for distribution: UNet (its EMA weights), VAE and spec only, in ``dtype``
    (fp16, bf16 or fp32); training state, checkpoints, samples and logs stay behind. ``step``: a training
    run's checkpoint at that step instead of its final weights (a run still going, or an earlier point of
    one). The folder appears whole or not at all. Returns its size in bytes."""
    model, out = Path(model), Path(out)
    if dtype not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"dtype {dtype!r} unknown; choose fp16, bf16 or fp32")
    if out.exists():
        raise ValueError(f"{out} exists; export writes a fresh folder")
    loaded = checkpoint_model(model, step) if step is not None else load_model_folder(model)
    save_model_folder(loaded, out, None if dtype == "fp32" else dtype)
    atomic_write_bytes(out / SPEC_NAME, (model / SPEC_NAME).read_bytes())  # as written, version stamp too
    if (model / VOCABULARY_NAME).is_file():  # with where the words came from
        atomic_write_bytes(out / VOCABULARY_NAME, (model / VOCABULARY_NAME).read_bytes())
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
