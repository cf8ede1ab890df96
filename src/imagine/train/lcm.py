"""Latent consistency distillation (Luo et al. 2023, Algorithm 1): a model that samples in 1 to 4 steps.

The student is the teacher's UNet plus a guidance-scale input (its cond_proj starts at zero, so step 0 is
the teacher) read through the consistency boundary parametrization f(x, t) = c_skip x + c_out x0_hat, exact
at t = 0. Each step draws a grid index n and a guidance weight w (cfg = 1 + w), noises a latent to t_{n+k},
runs one DDIM step of the teacher with classifier-free guidance folded in (the augmented PF-ODE solver) to
t_n, and pulls f_student(x_{t_{n+k}}) toward f_target(x_{t_n}), the target being an EMA of the student.

LCM-LoRA (Luo et al. 2023b): with ``lora_rank`` the student is the frozen teacher plus a LoRA and no
guidance input (it is used with cfg 1), its own target, as diffusers' train_lcm_distill_lora does; the LoRA
then carries the acceleration to fine-tunes of the same base.

A flow teacher (SD3's, Flux's, or imagine's flow models) distils the same way on the straight path: its grid
timesteps are flow times, its solver step is Euler's (diffusion/consistency.py holds both parametrizations'
math), and the student is walked by the lcm sampler over the same grid (PixArt-delta's point: few steps for
transformers too). A transformer has no guidance input to add: it distils as an LCM-LoRA.

Randomness is per sample, from (seed, sample counter), so a resumed run repeats the uninterrupted one."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from imagine.adapters.lora import attach, create
from imagine.devices import autocast, placed, resolve_device, text_modules
from imagine.diffusion.consistency import consistency_schedule
from imagine.diffusion.schedules import lcm_grid
from imagine.io.lora_keys import save_lora
from imagine.io.model_folder import DiffusionModel, save_model_folder
from imagine.models.unet import UNet2DConditionModel
from imagine.nn.embeddings import guidance_embedding
from imagine.pipelines.generate import txt2img
from imagine.pipelines.settings import Settings
from imagine.pipelines.unconditional import grid, to_uint8
from imagine.train.loop import DataOrder, Hook, StepInfo, _sample_generator, posterior_latents
from imagine.train.lora import AdapterTrainConfig, _load_state, _save_state, base_record, checkpoint_dir

LCMLoss = Literal["huber", "l2"]


@dataclass(frozen=True)
class LCMDistillConfig(AdapterTrainConfig):
    lr: float = 1e-4
    original_steps: int = 50  # N of the skipping grid: one solver step spans k = T // N teacher timesteps
    cfg_min: float = 1.5  # the guidance scales the student learns (w = cfg - 1 is embedded)
    cfg_max: float = 6.0
    ema_decay: float = 0.95  # the target network's EMA (the paper's mu)
    w_embed_dim: int = 256  # the guidance embedding's width (diffusers' time_cond_proj_dim)
    loss: LCMLoss = "huber"
    huber_c: float = 0.001  # pseudo-Huber: sqrt(d^2 + c^2) - c per element
    lora_rank: int = 0  # > 0: distil LCM-LoRA of this rank instead (no guidance input, cfg 1 at use)

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.cfg_min <= self.cfg_max:
            raise ValueError(f"need 1 <= cfg_min <= cfg_max, got {self.cfg_min}, {self.cfg_max}")
        if self.loss not in ("huber", "l2"):
            raise ValueError(f"loss {self.loss!r} unknown; choose huber or l2")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema decay must lie in [0, 1), got {self.ema_decay}")
        if self.lora_rank < 0:
            raise ValueError(f"LoRA rank must be >= 0, got {self.lora_rank}")


def student_unet(teacher: torch.nn.Module, w_embed_dim: int) -> torch.nn.Module:
    """The teacher's UNet with a guidance-scale input whose projection starts at zero (the teacher exactly)."""
    if not isinstance(teacher, UNet2DConditionModel):
        raise ValueError(f"a {type(teacher).__name__} has no guidance-scale input to learn: distil it as an "
                         "LCM-LoRA (--lora-rank, used at cfg 1)")
    if teacher.config.time_cond_proj_dim is not None:
        raise ValueError("the teacher already embeds its guidance scale (it is an LCM); distil from its base model")
    student = UNet2DConditionModel(replace(teacher.config, time_cond_proj_dim=w_embed_dim))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(next(teacher.parameters()).dtype)


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: LCMLoss, c: float) -> torch.Tensor:
    if kind == "l2":
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    return (((pred.float() - target.float()) ** 2 + c**2).sqrt() - c).mean()


def _draws(seed: int, counter: int, grid_size: int, shape: tuple[int, ...], cfg: LCMDistillConfig):
    """Sample ``counter``'s grid index, guidance scale and noise, from its own generator."""
    g = _sample_generator(seed, counter)
    n = int(torch.randint(0, grid_size, (1,), generator=g))
    scale = cfg.cfg_min + (cfg.cfg_max - cfg.cfg_min) * float(torch.rand((1,), generator=g))
    return n, scale, torch.randn(shape, generator=g)


def distill_lcm(model, text_encoder, data, cfg: LCMDistillConfig, out: Path | str, *, resume: bool = False,
                hooks: tuple[Hook, ...] = (), device: str | torch.device = "cpu") -> Path:
    """Distil ``model`` (a loaded text-to-image DiffusionModel, the teacher) on ``data`` (captioned images at
    its size) into a latent consistency model folder at ``out`` (UNet with a guidance input, the teacher's VAE,
    a diffusion.json that selects the lcm sampler at 4 steps), or with ``cfg.lora_rank`` into an LCM-LoRA
    file (.safetensors, kohya's layout). Checkpoints, log and sample grids go to OUT-training/. ``device``: where
    it trains (the draws stay the CPU's, so a run is the same on any device); everything is back on the CPU
    when it returns."""
    out = Path(out)
    device = resolve_device(device)
    spec, teacher, vae = model.spec, model.unet, model.vae
    if spec.text_encoder is None or text_encoder is None:
        raise ValueError("LCM distillation needs a text-to-image teacher and its text encoder")
    if spec.learned_variance:
        raise ValueError("LCM distillation reads a teacher without learned variance")
    if cfg.lora_rank and out.suffix != ".safetensors":
        raise ValueError(f"{out}: an LCM-LoRA is written as .safetensors")
    if not cfg.lora_rank and out.suffix:
        raise ValueError(f"{out}: an LCM is written as a model folder (a path without a suffix)")
    if out.exists() and not resume:
        raise ValueError(f"{out} exists; choose another --out, or --resume to train it on")
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    teacher.requires_grad_(False).eval()
    schedule = consistency_schedule(spec)  # where grid timesteps put samples, the solver step, the boundary
    grid = lcm_grid(spec.num_train_timesteps, cfg.original_steps)
    k = spec.num_train_timesteps // cfg.original_steps

    if cfg.lora_rank:  # the student is the teacher plus a LoRA; its own target
        parts = {"unet": teacher}
        lora = create(parts, cfg.lora_rank, None, "attn+ff", False, seed=cfg.seed)
        params = {}
        for key, layer in lora.layers.items():
            params[f"lora.{key}.down.weight"] = layer.down.weight
            params[f"lora.{key}.up.weight"] = layer.up.weight
        trained = list(params.values())
        student, target, ema = teacher, teacher, None
    else:
        student = student_unet(teacher, cfg.w_embed_dim).train().requires_grad_(True)
        target = copy.deepcopy(student).eval().requires_grad_(False)
        trained = list(student.parameters())
        params = {f"student.{name}": p for name, p in student.named_parameters()}
        params.update({f"target.{name}": p for name, p in target.named_parameters()})
        ema = target
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0)
    must_match = {"lora_rank": cfg.lora_rank, "original_steps": cfg.original_steps}
    handle = attach({"unet": teacher}, [(lora, 1.0)]) if cfg.lora_rank else None
    networks = [teacher, vae, *text_modules(text_encoder), *((lora,) if cfg.lora_rank else (student, target))]
    with placed(networks, list(params.values()), device):
        _distill(model, text_encoder, data, cfg, root, params, optimizer, must_match, resume, hooks, handle,
                 lora if cfg.lora_rank else None, student, target, ema, schedule, grid, k, device)
    if cfg.lora_rank:
        record = {**asdict(cfg), **base_record(model), "lcm": True}
        save_lora(lora, out, "kohya", ldm_names_for=teacher if model.family.kohya_unet_names == "ldm" else None,
                  metadata={"imagine_lora": json.dumps(record)})
        return out
    lcm = _as_model(model, target, cfg)
    # the student learns only what the teacher draws for the data's captions
    words = data.vocabulary() if hasattr(data, "vocabulary") else None
    vocabulary = words | model.vocabulary if words is not None and model.vocabulary is not None else None
    save_model_folder(DiffusionModel(lcm.unet.eval(), model.vae, lcm.spec, out, vocabulary=vocabulary), out,
                      replace=True)
    return out


def _distill(model, text_encoder, data, cfg, root, params, optimizer, must_match, resume, hooks, handle, lora,
             student, target, ema, schedule, grid, k, device):
    """distill_lcm's loop, on ``device``."""
    spec, teacher, vae = model.spec, model.unet, model.vae
    try:
        start = _load_state(root, params, optimizer, must_match) if resume else 0
        log_path = root / "log.jsonl"
        if not resume and log_path.exists():
            log_path.unlink()
        order = DataOrder(len(data), cfg.seed, getattr(data, "infinite", False))
        f = vae.config.downscale if vae is not None else 1
        size = spec.image_size
        channels = vae.config.latent_channels if vae is not None else spec.image_channels
        shape = (channels, size // f, size // f)
        empty = text_encoder.encode([""])

        def conditioning(captions: list[str]) -> tuple[dict, dict]:
            text = text_encoder.encode(captions)
            b = len(captions)
            context, mask = empty.context.expand(b, -1, -1), empty.mask.expand(b, -1)
            pooled = empty.pooled.expand(b, -1) if empty.pooled is not None else None
            cond = {"encoder_hidden_states": text.context, "encoder_attention_mask": text.mask,
                    **model.family.conditioning(text.pooled, size, size, text.context, text.mask)}
            # the family's extra inputs (SDXL's micro-conditioning, an MMDiT's pooled text) on both branches
            uncond = {"encoder_hidden_states": context, "encoder_attention_mask": mask,
                      **model.family.conditioning(pooled, size, size, context, mask)}
            return cond, uncond

        def f_of(network, x_t, s, cond, w_emb):
            """The consistency function of ``network`` at x_s, integer grid timesteps s (B,)."""
            extra = {"timestep_cond": w_emb} if w_emb is not None else {}
            with autocast(device, cfg.precision == "bf16"):
                output = network(x_t, schedule.network_t(s).to(device), **cond, **extra).float()
            return schedule.f(output, x_t, s)

        # the hooks draw with the target as it stands (updated in place); LCM-LoRA: the model, LoRA attached
        context = {"teacher": model, "text_encoder": text_encoder, "out": root, "config": cfg,
                   "student": model if cfg.lora_rank else _as_model(model, target, cfg)}
        tick = time.perf_counter()
        for step in range(start, cfg.steps):
            counters = range(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            idx = [order(c) for c in counters]
            draws = [_draws(cfg.seed, c, len(grid), shape, cfg) for c in counters]
            images, _, captions = data.batch(idx, torch.zeros(len(idx), dtype=torch.bool))
            if captions is None:
                raise ValueError(f"{data.source} has no captions: give each image a .txt (or a metadata.jsonl)")
            x0 = posterior_latents(vae, images, cfg.seed + 1, counters, shape).to(device)
            with torch.no_grad():
                t = grid[torch.tensor([n for n, _, _ in draws])]
                t_prev = schedule.previous(t, k)
                scale = torch.tensor([s for _, s, _ in draws])
                noise = torch.stack([z for _, _, z in draws]).to(device)  # drawn on the CPU, as on any device
                x_t = schedule.noisy(x0, noise, t)
                cond, uncond = conditioning(list(captions))
                w_emb = None if cfg.lora_rank else guidance_embedding(scale - 1, cfg.w_embed_dim).to(device)
                # one DDIM step of the teacher under CFG: x0 and eps at cfg scale, then to t_prev
                if handle is not None:
                    handle.detach()
                with autocast(device, cfg.precision == "bf16"):
                    both = teacher(torch.cat([x_t, x_t]), schedule.network_t(torch.cat([t, t])).to(device),
                                   **{key: torch.cat([uncond[key], cond[key]]) for key in cond}).float()
                if handle is not None:
                    handle = attach({"unet": teacher}, [(lora, 1.0)])
                x0_both, eps_both = schedule.x0_eps(both, torch.cat([x_t, x_t]), torch.cat([t, t]))
                (x0_u, x0_c), (eps_u, eps_c) = x0_both.chunk(2), eps_both.chunk(2)
                g = (scale - 1).reshape(-1, 1, 1, 1).to(device)
                x0_hat, eps_hat = x0_c + g * (x0_c - x0_u), eps_c + g * (eps_c - eps_u)
                x_prev = schedule.step(x0_hat, eps_hat, t_prev)
                target_f = f_of(target, x_prev, t_prev, cond, w_emb)
            loss = consistency_loss(f_of(student, x_t, t, cond, w_emb), target_f, cfg.loss, cfg.huber_c)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                with torch.no_grad():
                    for p_t, p_s in zip(ema.parameters(), student.parameters(), strict=True):
                        p_t.lerp_(p_s.detach(), 1 - cfg.ema_decay)
            done = step + 1
            now = time.perf_counter()
            info = StepInfo(done, cfg.steps, float(loss.detach()), cfg.lr, cfg.batch_size / max(now - tick, 1e-9),
                            now - tick)
            if done % cfg.log_every == 0 or done == cfg.steps:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(asdict(info)) + "\n")
            for hook in hooks:
                hook(info, context)
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
                _save_state(root, done, params, optimizer, {"config": {**asdict(cfg), **must_match}})
            tick = time.perf_counter()
    finally:
        if handle is not None:
            handle.detach()


def _as_model(teacher_model, unet: torch.nn.Module, cfg: LCMDistillConfig):
    """The LCM as a DiffusionModel: ``unet``, the teacher's VAE and text encoder, a spec for the lcm sampler."""
    spec = replace(teacher_model.spec, consistency=True, default_sampler="lcm", default_steps=4)
    return DiffusionModel(unet, teacher_model.vae, spec, teacher_model.path, text_encoder=teacher_model.text_encoder,
                          arch=teacher_model.arch)


def lcm_sample_hook(prompts: list[str], every: int, steps: tuple[int, ...] = (1, 2, 4), seeds: int = 3):
    """Every ``every`` steps (and at the last): a grid with a row per prompt and step count and ``seeds``
    columns, drawn by the student as its target stands (the LCM sampler), under OUT-training/samples/."""
    def hook(info, context):
        if info is None or not every or not prompts or (info.step % every and info.step != info.total):
            return
        model, encoder = context["student"], context["text_encoder"]
        rows, labels = [], []
        with torch.no_grad():
            for prompt in prompts:
                for n in steps:
                    cfg = 1.0 if context["config"].lora_rank else model.spec.default_cfg  # LCM-LoRA: no CFG
                    s = Settings(prompt=prompt, steps=n, sampler="lcm", cfg_scale=cfg, n=seeds)
                    rows.append(txt2img(model, s, encoder))
                    labels.append(f"{prompt} ({n} steps)")
        path = context["out"] / "samples" / f"step_{info.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid(to_uint8(torch.cat(rows)), rows=len(rows)).squeeze()).save(path)
        path.with_suffix(".txt").write_text("\n".join(labels) + "\n")

    return hook
