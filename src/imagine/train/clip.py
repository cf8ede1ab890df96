"""Training the CLIP-style scorer on builtin:shapes, and measuring its zero-shot retrieval on held-out scenes.

A fixed pool of scenes is rendered once and each distinct caption goes through the frozen text encoder
once; training then only runs the image tower and the text projection. Held-out scenes come from a
disjoint index range of the same generator."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from imagine.data.shapes import COLORS, SHAPES, ShapesDataset, make_scene
from imagine.io.networks import save_clip
from imagine.models.clip import CLIPConfig, ShapesCLIP, contrastive_loss
from imagine.train.loop import training_device

HELD_OUT_START = 50_000_000  # scene indices of the evaluation set; training uses 0 .. pool - 1


@dataclass(frozen=True)
class CLIPTrainConfig:
    pool: int = 12_000  # training scenes
    steps: int = 1200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0
    held_out: int = 1000
    model: CLIPConfig = field(default_factory=CLIPConfig)


CLIP_PRESETS = {
    "shapes-clip": CLIPTrainConfig(),
    "tiny": CLIPTrainConfig(pool=96, steps=6, batch_size=32, held_out=64, warmup_steps=2,
                            model=CLIPConfig(image_size=16, block_out_channels=(8, 16), feature_dim=32, text_hidden=32,
                                             embed_dim=16)),
}


def _render(ds: ShapesDataset, indices) -> tuple[torch.Tensor, list[str]]:
    images, captions = [], []
    for i in indices:
        scene, image = ds.scene(i)
        images.append(torch.from_numpy(image.copy()).permute(2, 0, 1))
        captions.append(scene.caption)
    return torch.stack(images), captions


def _pooled(text_encoder, captions: list[str], chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled text inputs of each distinct caption, caption id of each item)."""
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    pooled = []
    for start in range(0, len(distinct), chunk):
        text = text_encoder.encode(distinct[start:start + chunk])
        pooled.append(ShapesCLIP.pool_text(text.context, text.mask))
    return torch.cat(pooled), torch.tensor([index[c] for c in captions])


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1


@torch.no_grad()
def zero_shot(model: ShapesCLIP, text_encoder, size: int, n: int = 1000, seed: int = 0) -> dict[str, float]:
    """On held-out scenes: image -> caption and caption -> image top-1 among groups of 100, and zero-shot
    classification of single-object scenes among the 36 prompts "a {colour} {shape}"."""
    ds = ShapesDataset(size, seed=seed)
    images, captions = _render(ds, range(HELD_OUT_START, HELD_OUT_START + n))
    pooled, ids = _pooled(text_encoder, captions)
    img = torch.cat([model.encode_image(to_unit(images[s:s + 256])) for s in range(0, n, 256)])
    txt = model.encode_pooled_text(pooled)[ids]
    size = min(100, n)  # candidates per query
    i2t = t2i = total = 0
    for start in range(0, n - n % size, size):
        group = slice(start, start + size)
        sim = img[group] @ txt[group].T
        same = ids[group][:, None] == ids[group][None, :]  # a duplicate caption counts as right
        i2t += same[torch.arange(len(sim)), sim.argmax(1)].sum().item()
        t2i += same[sim.argmax(0), torch.arange(len(sim))].sum().item()
        total += len(sim)
    labels = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    text = text_encoder.encode(labels)
    label_emb = model.encode_text(text.context, text.mask)
    scenes = [make_scene(HELD_OUT_START + k, seed) for k in range(n)]
    singles = [k for k in range(n) if scenes[k].kind == "single"]
    right = 0
    for k in singles:
        obj = scenes[k].objects[0]
        guess = labels[int((img[k] @ label_emb.T).argmax())]
        right += guess == f"a {obj.color} {obj.shape}"
    return {"image_to_text_top1": i2t / total, "text_to_image_top1": t2i / total,
            "classification_top1": right / max(1, len(singles)), "held_out": n, "single_object_scenes": len(singles),
            "candidates": size, "classes": len(labels)}


def train_clip(cfg: CLIPTrainConfig, out: Path, text_encoder, progress: Callable[[int, float], None] | None = None,
               device: str | None = None) -> dict:
    """Train, evaluate on held-out scenes, and write ``out`` (config.json, model.safetensors, eval.json);
    ``device`` as loop.training_device takes it (the text states are computed once, beforehand, where the text
    encoder is; the batches are drawn on the CPU)."""
    device = training_device(device)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    size = cfg.model.image_size
    model_cfg = replace(cfg.model, text_dim=text_encoder.dim, text_encoder=getattr(text_encoder, "identity", "minilm"))
    model = ShapesCLIP(model_cfg)
    ds = ShapesDataset(size, seed=cfg.seed)
    images, captions = _render(ds, range(cfg.pool))
    pooled, ids = _pooled(text_encoder, captions)
    model.to(device)
    images, pooled = images.to(device), pooled.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (
        1 + np.cos(np.pi * min(1.0, s / cfg.steps))))
    g = torch.Generator().manual_seed(cfg.seed)
    log = []
    for step in range(cfg.steps):
        idx = torch.randperm(cfg.pool, generator=g)[: cfg.batch_size]
        batch_ids = ids[idx].to(device)
        idx = idx.to(device)
        logits = model.logit_scale.exp().clamp(max=100) * (
            model.encode_image(to_unit(images[idx])) @ model.encode_pooled_text(pooled[batch_ids]).T)
        loss = contrastive_loss(logits, batch_ids[:, None] == batch_ids[None, :])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        log.append(loss.item())
        if progress is not None:
            progress(step + 1, log[-1])
    model.eval().to("cpu")
    metrics = zero_shot(model, text_encoder, size, cfg.held_out, cfg.seed)
    metrics.update(train_seconds=time.perf_counter() - started, final_loss=float(np.mean(log[-20:])),
                   config={**asdict(cfg), "model": asdict(model_cfg)})
    out = Path(out)
    save_clip(model, out)
    (out / "eval.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics
