"""Training a LoRA (Hu et al. 2021) on a frozen model: one loop, top to bottom, with hooks.

The base model's weights never change; the LoRA's updates are attached (B = 0, so step 0 is the base
model) and only they are optimized, with the diffusion loss the model was trained with (its spec's
schedule and parametrization). Randomness is per sample, from (seed, sample counter), as in
train/loop.py, so a resumed run repeats the uninterrupted one exactly. Checkpoints hold the LoRA, the
optimizer and the RNG in one safetensors file, written atomically."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from imagine.adapters.lora import attach, create, forget_text_cache, parts_of
from imagine.data.images import ImageDataset
from imagine.devices import autocast, placed, resolve_device, text_modules
from imagine.diffusion.objectives import objective
from imagine.io.checkpoint import CheckpointError, atomic_save_safetensors, atomic_write_bytes, read_safetensors
from imagine.io.lora_keys import save_lora
from imagine.io.png import file_hash
from imagine.io.stable_diffusion import save_like
from imagine.pipelines.generate import txt2img
from imagine.pipelines.settings import Settings
from imagine.pipelines.unconditional import grid, to_uint8
from imagine.train.checkpoint import _flatten_optimizer, _unflatten_optimizer
from imagine.train.loop import DataOrder, Hook, StepInfo, posterior_latents, sample_draws


@dataclass(frozen=True)
class AdapterTrainConfig:
    """What every adapter training (LoRA, DreamBooth, textual inversion) shares."""

    steps: int = 500
    batch_size: int = 4
    lr: float = 1e-4
    seed: int = 0
    flip: bool = False
    caption_dropout: float = 0.0
    precision: str = "fp32"
    checkpoint_every: int = 100
    log_every: int = 10
    prior_weight: float = 1.0  # DreamBooth: the class-prior loss's weight (used when class data is given)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be >= 1")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {self.precision!r} unknown; choose fp32 or bf16")


@dataclass(frozen=True)
class LoraTrainConfig(AdapterTrainConfig):
    rank: int = 4
    alpha: float | None = None  # default: the rank (scale 1)
    targets: str = "attn"  # attn, attn+ff or all (see adapters/lora.py)
    text_encoder: bool = False  # also train LoRAs on the text encoder's attention
    algo: str = "lora"  # lora, locon (LoRA on every layer), loha, lokr or dora (LyCORIS's layout)


def checkpoint_dir(out: Path) -> Path:
    """Where a run's checkpoints, log and samples go: OUT-training/ beside the file (or folder) it writes."""
    return out.parent / f"{out.stem if out.suffix == '.safetensors' else out.name}-training"


def _save_state(root: Path, step: int, params: dict[str, torch.Tensor], optimizer, meta: dict[str, Any]) -> Path:
    tensors = {k: v.detach().cpu().contiguous() for k, v in params.items()}
    optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update({k: v.detach().cpu() for k, v in optim_tensors.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    path = root / f"step_{step:07d}.safetensors"
    atomic_save_safetensors(tensors, path, {"state": json.dumps({"step": step, "optimizer": optim_meta, **meta})})
    atomic_write_bytes(root / "latest", path.name.encode())
    for old in sorted(root.glob("step_*.safetensors"))[:-2]:
        old.unlink(missing_ok=True)
    return path


def _load_state(root: Path, params: dict[str, torch.Tensor], optimizer, must_match: dict[str, Any]) -> int:
    pointer = root / "latest"
    if not pointer.exists():
        raise FileNotFoundError(f"--resume: no checkpoint under {root}")
    tensors, metadata = read_safetensors(root / pointer.read_text().strip())
    meta = json.loads(metadata["state"])
    saved = meta.get("config", {})
    if any(saved.get(k) != v for k, v in must_match.items()):
        raise CheckpointError(f"--resume with other settings ({', '.join(must_match)}) than the checkpoint's: "
                              f"{ {k: saved.get(k) for k in must_match} }")
    missing = [k for k in params if k not in tensors]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} trained tensors: {missing[:5]}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


def fit(model, text_encoder, data, cfg: AdapterTrainConfig, root: Path, params: dict[str, torch.Tensor], *,
        text_grad: bool, must_match: dict[str, Any], resume: bool = False, hooks: tuple[Hook, ...] = (),
        prior=None, prompt=None, context: dict[str, Any] | None = None, control=None,
        device: str | torch.device = "cpu", modules: tuple = ()) -> None:
    """The adapter training loop: optimize ``params`` (name -> leaf tensor; the model stays frozen) with the
    model's own diffusion loss on ``data``, checkpointing to ``root`` (resumable exactly). The caller has
    attached what ``params`` belong to. text_grad: gradients flow through the text encoder (its LoRA, or
    textual-inversion vectors). prompt: caption -> the prompt trained on (default: the caption).

    prior: DreamBooth's class data (Ruiz et al. 2023, eq. 2): images of the class the base model drew
    for the class prompt. Each step then adds ``cfg.prior_weight`` x the same loss on as many class images,
    so the model keeps drawing the class as it did while it learns the subject.

    control: (images (B, C, H, W) in [-1, 1], on the CPU, x_t, t, cond, indices=the items' indices) -> UNet
    inputs to add or replace (a ControlNet's or T2I-Adapter's residuals from each image's condition; an
    IP-Adapter's context pair from each item's reference image).

    device: where it trains (devices.resolve_device); the model, its text encoder, ``modules`` (a ControlNet, an
    image encoder) and ``params`` go there for the run and come back to the CPU after it. The draws (noise,
    timesteps, flips) are made on the CPU as ever, so a run is the same draw for draw on any device."""
    device = resolve_device(device)
    everything = [model.unet, model.vae, *text_modules(text_encoder), *modules]
    with placed(everything, list(params.values()), device):
        _fit(model, text_encoder, data, cfg, root, params, text_grad, must_match, resume, hooks, prior, prompt,
             context, control, device)


def _fit(model, text_encoder, data, cfg, root, params, text_grad, must_match, resume, hooks, prior, prompt, context,
         control, device: torch.device) -> None:
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    spec, unet, vae = model.spec, model.unet, model.vae
    alphas_cumprod = spec.alphas_cumprod().float().to(device)
    goal = objective(spec.prediction, alphas_cumprod, learned_variance=spec.learned_variance)  # VP or flow
    start = _load_state(root, params, optimizer, must_match) if resume else 0
    log_path = root / "log.jsonl"
    if not resume and log_path.exists():
        log_path.unlink()
    position = DataOrder(len(data), cfg.seed, getattr(data, "infinite", False))
    f = vae.config.downscale if vae is not None else 1
    size = spec.image_size
    channels = vae.config.latent_channels if vae is not None else spec.image_channels
    item_shape = (channels, size // f, size // f)
    prior_position = DataOrder(len(prior), cfg.seed + 5, False) if prior is not None else None

    def batch_loss(dataset, order, seed: int, step: int, own_prompts: bool) -> torch.Tensor:
        """The diffusion loss on one batch of ``dataset``, every draw from (seed, sample counter)."""
        counters = range(step * cfg.batch_size, (step + 1) * cfg.batch_size)
        idx, t, noise, flips, prompts_drop = [], [], [], [], []
        for c in counters:
            idx.append(order(c))
            draws = sample_draws(seed, c, len(alphas_cumprod), item_shape, cfg.flip, cfg.caption_dropout,
                                 goal.draw_t)
            for values, value in zip((t, noise, flips, prompts_drop), draws, strict=True):
                values.append(value)
        images, _, captions = dataset.batch(idx, torch.tensor(flips))
        if captions is None:
            raise ValueError(f"{dataset.source} has no captions: give each image a .txt (or a metadata.jsonl)")
        if own_prompts and prompt is not None:
            captions = [prompt(c) for c in captions]
        x0 = posterior_latents(vae, images, seed + 1, counters, item_shape).to(device)
        noise_t, t_t = torch.stack(noise).to(device), goal.timesteps(t, device)
        x_t, network_t = goal.noisy(x0, noise_t, t_t)
        prompts = ["" if drop else cap for drop, cap in zip(prompts_drop, captions, strict=True)]
        text = text_encoder.encode(prompts, grad=text_grad)
        cond = {"encoder_hidden_states": text.context, "encoder_attention_mask": text.mask}
        # what the family takes besides the text states (SDXL: pooled text and size ids; MMDiT: pooled text)
        cond.update(model.family.conditioning(text.pooled, size, size, text.context, text.mask))
        with autocast(device, cfg.precision == "bf16"):
            if control is not None:
                cond.update(control(images, x_t, network_t, cond, indices=idx))
            output = unet(x_t, network_t, **cond)
        return goal.loss(output.float(), x0, noise_t, x_t, t_t)

    tick = time.perf_counter()
    for step in range(start, cfg.steps):
        loss = batch_loss(data, position, cfg.seed, step, True)
        if prior is not None:  # DreamBooth's prior preservation: the class as the base model drew it
            loss = loss + cfg.prior_weight * batch_loss(prior, prior_position, cfg.seed + 7, step, False)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step + 1}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        now = time.perf_counter()
        info = StepInfo(done, cfg.steps, float(loss.detach()), cfg.lr, cfg.batch_size / max(now - tick, 1e-9),
                        now - tick)
        if done % cfg.log_every == 0 or done == cfg.steps:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(asdict(info)) + "\n")
        for hook in hooks:
            hook(info, {"model": model, "text_encoder": text_encoder, "out": root, "config": cfg, **(context or {})})
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            _save_state(root, done, params, optimizer, {"config": {**asdict(cfg), **must_match}})
        tick = time.perf_counter()


def base_record(model) -> dict[str, Any]:
    """The base model an adapter was trained on, as its file records it."""
    weights = model.weights_file
    return {"base_model": model.name, "base_model_hash": file_hash(weights) if weights.exists() else None}


def train_lora(model, text_encoder, data, cfg: LoraTrainConfig, out: Path | str, *, resume: bool = False,
               hooks: tuple[Hook, ...] = (), prior=None, device: str | torch.device = "cpu") -> Path:
    """Train a LoRA for ``model`` (a loaded DiffusionModel with its text encoder) on ``data`` (captioned
    images at the model's size) and write it to ``out`` (.safetensors, kohya's layout). Checkpoints,
    the log and sample grids go to OUT-training/ beside it. prior: DreamBooth's class data (see ``fit``)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: a LoRA is written as .safetensors")
    if model.spec.text_encoder is None or text_encoder is None:
        raise ValueError("LoRA training needs a text-to-image model and its text encoder")
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    parts = parts_of(model, text_encoder)
    for part in parts.values():
        part.requires_grad_(False)
    lora = create(parts, cfg.rank, cfg.alpha, cfg.targets, cfg.text_encoder, seed=cfg.seed, algo=cfg.algo)
    params = {f"lora.{key}": p for key, p in lora.trainable().items()}
    handle = attach(parts, [(lora, 1.0)], text_encoder=text_encoder)
    try:
        fit(model, text_encoder, data, cfg, root, params, text_grad=cfg.text_encoder, resume=resume, hooks=hooks,
            prior=prior, must_match={"rank": cfg.rank, "targets": cfg.targets, "algo": cfg.algo},
            context={"lora": lora}, device=device, modules=(lora,))
    finally:
        handle.detach()
    metadata = {"imagine_lora": json.dumps({**asdict(cfg), **base_record(model)})}
    ldm_names = model.unet if model.family.kohya_unet_names == "ldm" else None
    save_lora(lora, out, "kohya", ldm_names_for=ldm_names, metadata=metadata)
    return out


def train_full(model, text_encoder, data, cfg: AdapterTrainConfig, out: Path | str, *, resume: bool = False,
               hooks: tuple[Hook, ...] = (), prior=None, device: str | torch.device = "cpu") -> Path:
    """DreamBooth as the paper does it: fine-tune every UNet weight (the text encoder stays frozen), with
    the prior-preservation loss when ``prior`` is given (see ``fit``), and write the whole model to ``out``
    (a .safetensors single file, or a folder of the base's kind). The model is changed in place."""
    out = Path(out)
    if model.spec.text_encoder is None or text_encoder is None:
        raise ValueError("DreamBooth needs a text-to-image model and its text encoder")
    if next(model.unet.parameters()).dtype != torch.float32:
        raise ValueError("full fine-tuning needs fp32 weights (load the model with fp32 weights)")
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    model.unet.requires_grad_(True)
    params = {f"unet.{k}": p for k, p in model.unet.named_parameters()}
    try:
        fit(model, text_encoder, data, cfg, root, params, text_grad=False, resume=resume, hooks=hooks, prior=prior,
            must_match={"full": True}, context={}, device=device)
    finally:
        model.unet.requires_grad_(False).eval()
    return save_like(model, model.path, out)


def lora_sample_hook(prompts: list[str], every: int, steps: int = 20):
    """Every ``every`` steps (and at the last): a grid of ``prompts`` (rows) by 4 seeds, drawn with the LoRA
    as it stands (it is attached while training), under OUT-training/samples/."""
    def hook(info, context):
        if info is None or not every or not prompts or (info.step % every and info.step != info.total):
            return
        model, encoder = context["model"], context["text_encoder"]
        forget_text_cache(encoder)  # what is training may change the text states (a text LoRA, embeddings)
        settings = Settings(steps=steps, cfg_scale=model.spec.default_cfg, n=4, sampler=model.spec.default_sampler)
        with torch.no_grad():
            images = torch.cat([txt2img(model, Settings(**{**settings.to_dict(), "prompt": p}), encoder)
                                for p in prompts])
        path = context["out"] / "samples" / f"step_{info.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid(to_uint8(images), rows=len(prompts)).squeeze()).save(path)
        path.with_suffix(".txt").write_text("\n".join(prompts) + "\n")

    return hook


def class_images(model, text_encoder, prompts: str | list[str], count: int, folder: Path, *, seed: int = 0,
                 steps: int | None = None, callback=None):
    """DreamBooth's class data: ``count`` images the base model draws, image i for ``prompts[i % len]``
    with seed + i (one class prompt, as the paper; several, as kohya's captioned regularisation images),
    cached as PNGs in ``folder`` with the prompt written in each, reused when the prompt and seed match and
    drawn again when they do not. Returns a captioned ImageDataset."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("class images need a class prompt")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, captions = [], []
    for i in range(count):
        prompt, path = prompts[i % len(prompts)], folder / f"{seed + i:06d}.png"
        cached = None
        if path.exists():
            with Image.open(path) as img:
                if img.text.get("class_prompt") == prompt:
                    cached = np.asarray(img.convert("RGB" if model.spec.image_channels == 3 else "L"))
        if cached is None:
            s = Settings(prompt=prompt, seed=seed + i, steps=steps or model.spec.default_steps,
                         sampler=model.spec.default_sampler, cfg_scale=model.spec.default_cfg)
            with torch.no_grad():
                cached = to_uint8(txt2img(model, s, text_encoder))[0].squeeze()
            info = PngImagePlugin.PngInfo()
            info.add_text("class_prompt", prompt)
            tmp = path.with_suffix(".tmp.png")
            Image.fromarray(cached).save(tmp, pnginfo=info)
            tmp.replace(path)
        arr = cached.astype(np.float32) / 127.5 - 1
        tensors.append(torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()))
        captions.append(prompt)
        if callback is not None:
            callback(i + 1, count)
    return ImageDataset(torch.stack(tensors), torch.zeros(count, dtype=torch.long), ("class",), str(folder),
                        tuple(captions))
