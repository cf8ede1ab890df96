"""The training loop: one function, top to bottom (nanoGPT's train.py), with hooks.

Randomness is a pure function of (seed, step, sample): each sample of each step draws its timestep, noise,
flip and label dropout from its own generator, seeded from the global sample counter. So a resumed run
repeats the uninterrupted one exactly, and the draws do not depend on how the batch is split over
processes. Data order is a seeded permutation per epoch; the position is the sample counter.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from imagine.data.images import ImageDataset
from imagine.devices import resolve_device
from imagine.diffusion.objectives import objective
from imagine.diffusion.superres import augment, degrade, upsample
from imagine.families import of_network
from imagine.io.checkpoint import atomic_write_bytes
from imagine.io.model_folder import DiffusionModel, DiffusionSpec, save_spec, save_vocabulary
from imagine.io.networks import load_vae, save_unet, save_vae
from imagine.models import UNet2DConditionModel, UNetConfig
from imagine.models.dit import DiTConfig, DiTTransformer2DModel
from imagine.models.flux import FluxConfig, FluxTransformer2DModel, rope_axes
from imagine.models.mmdit import MMDiTConfig, SD3Transformer2DModel
from imagine.models.pixart import PixArtConfig, PixArtTransformer2DModel
from imagine.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from imagine.train.config import TrainConfig
from imagine.train.ema import EMA


@dataclass
class StepInfo:
    step: int  # steps completed
    total: int
    loss: float
    lr: float
    images_per_s: float
    seconds: float


Hook = Callable[[StepInfo, dict[str, Any]], None]


def _distributed() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; initializes the process group on first call."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def training_device(name: str | None) -> torch.device:
    """A run's device: "auto" (or None) is this process's CUDA GPU (cuda:LOCAL_RANK under torchrun) when there is
    one, else the CPU; a bare "cuda" is cuda:LOCAL_RANK too; anything else as devices.resolve_device says."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if name in (None, "auto"):
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = resolve_device(name)
    return torch.device("cuda", local) if device.type == "cuda" and str(name) == "cuda" else device


def _sample_generator(seed: int, counter: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + counter) % (2**63))


@torch.no_grad()
def posterior_latents(vae, images: torch.Tensor, seed: int, counters, shape: tuple[int, ...]) -> torch.Tensor:
    """A sample of each image's VAE posterior, scaled to the diffusion latent; its noise from the generator
    of (seed, sample counter), so a resumed run draws the same latents. Without a VAE: the images."""
    if vae is None:
        return images
    device = next(vae.parameters()).device
    posterior = vae.encode(images.to(device))
    eps = torch.stack([torch.randn(shape, generator=_sample_generator(seed, c)) for c in counters]).to(device)
    return vae.to_latent(posterior.mean + posterior.std * eps)


def sample_draws(seed: int, counter: int, timesteps: int, shape: tuple[int, ...], flip: bool, drop_p: float,
                 draw_t=None) -> tuple[int | float, torch.Tensor, bool, bool]:
    """One sample's draws, in this order from its own generator: timestep, noise, flip (drawn only when
    flipping is on), and whether its label or caption is dropped (probability ``drop_p``). ``draw_t``: the
    objective's own timestep draw (a flow model's t in (0, 1)); default uniform over ``timesteps``."""
    g = _sample_generator(seed, counter)
    t = int(torch.randint(timesteps, (1,), generator=g)) if draw_t is None else draw_t(g)
    noise = torch.randn(shape, generator=g)
    flipped = flip and bool(torch.rand(1, generator=g) < 0.5)
    return t, noise, flipped, bool(torch.rand(1, generator=g) < drop_p)


class DataOrder:
    """Which item the c-th sample of a run reads: a seeded permutation per epoch (cached), or, for an
    infinite dataset, item c itself."""

    def __init__(self, n: int, seed: int, infinite: bool = False):
        self.n, self.seed, self.infinite = n, seed, infinite
        self._epoch, self._order = -1, None

    def __call__(self, counter: int) -> int:
        if self.infinite:
            return counter
        epoch = counter // self.n
        if epoch != self._epoch:
            self._order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            self._epoch = epoch
        return int(self._order[counter % self.n])


class Prefetcher:
    """Renders the batches of the next steps in worker processes while the GPU trains on this one: a generated
    dataset (builtin:shapes draws each scene with Pillow, ~1 ms an image) otherwise keeps a GPU waiting. The
    batches are the ones the loop would make itself (same items, same flips), so results do not change."""

    def __init__(self, data, workers: int, plan: Callable[[int], tuple[list[int], list[bool]]], depth: int):
        self.data, self.plan, self.depth = data, plan, depth
        # spawned, not forked: the parent holds CUDA, which a forked child must not touch
        self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                        initargs=(1,))
        self.jobs: dict[int, Any] = {}

    def get(self, key: int):
        for k in range(key, key + self.depth):
            if k not in self.jobs:
                idx, flips = self.plan(k)
                self.jobs[k] = self.pool.submit(self.data.batch, idx, torch.tensor(flips))
        return self.jobs.pop(key).result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, constant, then (from lr_decay_from x steps) linear decay to 10% at the last step."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    start = int(cfg.lr_decay_from * cfg.steps)
    if step < start:
        return warm
    return warm * (1.0 - 0.9 * min(1.0, (step - start) / max(1, cfg.steps - start)))


def make_network(cfg: TrainConfig, channels: int, num_classes: int, context_dim: int | None = None,
                 side: int | None = None) -> nn.Module:
    """The run's denoiser network, freshly initialized: a UNet (make_unet_config), or a transformer over the
    run's side (in latent positions for a latent run): DiT (class-conditional), PixArt's DiT, SD3's MMDiT or
    Flux's double- and single-stream transformer (text)."""
    if cfg.arch == "unet":
        return UNet2DConditionModel(make_unet_config(cfg, channels, num_classes, context_dim))
    side = side or cfg.image_size
    if cfg.sr_scale > 1:
        raise ValueError("super-resolution stages are UNets (the low-resolution image rides in as channels)")
    common = {**cfg.transformer, "sample_size": side, "in_channels": channels}
    if cfg.arch == "dit":
        if context_dim is not None or not cfg.class_conditional:
            raise ValueError("a DiT is a class-conditional network (adaLN-Zero on the timestep and the class): "
                             "train it on class data such as builtin:digits; for text, --arch pixart, mmdit or flux")
        return DiTTransformer2DModel(DiTConfig.from_dict({
            **common, "out_channels": 2 * channels if cfg.learned_variance else None,
            "num_embeds_ada_norm": num_classes}))
    if context_dim is None or cfg.class_conditional:
        raise ValueError(f"--arch {cfg.arch} is a text-to-image network: train it on captioned data "
                         "(builtin:shapes-language, a folder with .txt captions)")
    if cfg.arch == "pixart":
        return PixArtTransformer2DModel(PixArtConfig.from_dict({
            **common, "out_channels": 2 * channels if cfg.learned_variance else None,
            "caption_channels": context_dim, "interpolation_scale": 1.0, "use_additional_conditions": False}))
    heads, head_dim = common.get("num_attention_heads", 2), common.get("attention_head_dim", 32)
    patch = common.get("patch_size", 2)
    if cfg.arch == "flux":
        if patch != 2:
            raise ValueError("a Flux packs its latents in 2 x 2 patches: leave the transformer's patch_size at 2")
        layers = common.get("num_layers", 2)
        double = max(1, layers // 2)
        return FluxTransformer2DModel(FluxConfig(
            in_channels=4 * channels, num_layers=double, num_single_layers=common.get("num_single_layers",
                                                                                      max(1, layers - double)),
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=context_dim,
            pooled_projection_dim=context_dim, axes_dims_rope=rope_axes(head_dim)))
    return SD3Transformer2DModel(MMDiTConfig.from_dict({
        **common, "out_channels": channels, "joint_attention_dim": context_dim, "pooled_projection_dim": context_dim,
        "caption_projection_dim": heads * head_dim, "pos_embed_max_size": 4 * side // patch}))


def make_unet_config(cfg: TrainConfig, channels: int, num_classes: int, context_dim: int | None = None) -> UNetConfig:
    settings = dict(cfg.unet)
    if context_dim is not None:
        settings["cross_attention_dim"] = context_dim
    if cfg.class_conditional:
        # one extra embedding: the "null" class that label dropout trains, for classifier-free guidance
        settings["num_class_embeds"] = num_classes + (1 if cfg.label_dropout > 0 else 0)
    if cfg.sr_scale > 1:  # the upsampled low-resolution image rides along as input channels, its level as a class
        settings["num_class_embeds"] = cfg.noise_levels or None
    return UNetConfig.from_dict({**settings, "sample_size": cfg.sr_crop or cfg.image_size,
                                 "in_channels": channels * (2 if cfg.sr_scale > 1 else 1), "out_channels": channels,
                                 "learned_variance": cfg.learned_variance})


def sr_pairs(cfg: TrainConfig, images: torch.Tensor, counters, alphas_cumprod: torch.Tensor,
             natives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A super-resolution stage's training inputs from full target images (B, C, S, S): each target (cropped to
    sr_crop), its low-resolution version upsampled back and noise-augmented (diffusion/superres.py), cropped the
    same, and its augmentation level. The low-resolution version is the target degraded, or, for a share
    cfg.sr_native of samples, ``natives[i]`` (the scene drawn small). The crop, level, augmentation noise and
    that choice come from the generator of (seed + 4, sample counter), so a resumed run draws the same."""
    size = images.shape[-1]
    up = upsample(degrade(images, cfg.sr_scale), tuple(images.shape[-2:]))
    native_up = upsample(natives, tuple(images.shape[-2:])) if natives is not None else None
    crop = cfg.sr_crop or size
    targets, lows, levels, noises = [], [], [], []
    for i, c in enumerate(counters):
        g = _sample_generator(cfg.seed + 4, c)
        top, left = (int(v) for v in torch.randint(size - crop + 1, (2,), generator=g))
        levels.append(int(torch.randint(max(1, cfg.noise_levels), (1,), generator=g)))
        noises.append(torch.randn((images.shape[1], crop, crop), generator=g))
        source = up
        if cfg.sr_native > 0 and float(torch.rand(1, generator=g)) < cfg.sr_native:
            if native_up is None:
                raise ValueError("sr_native needs data that can draw its scenes small (builtin:shapes)")
            source = native_up
        targets.append(images[i, :, top: top + crop, left: left + crop])
        lows.append(source[i, :, top: top + crop, left: left + crop])
    levels_t = torch.tensor(levels)
    return torch.stack(targets), augment(torch.stack(lows), levels_t, torch.stack(noises), alphas_cumprod), levels_t


def training_vocabulary(data, init: DiffusionModel | None) -> tuple[frozenset[str] | None, str]:
    """The words a text-conditioned run's model will have seen in captions, and where they came from: the
    data's, with those of the model it starts from (a fine-tune of a model with no recorded words has
    none either: what it knew is unknown)."""
    words = data.vocabulary() if hasattr(data, "vocabulary") else None
    source = data.source
    if init is not None:
        words = None if (words is None or init.vocabulary is None) else words | init.vocabulary
        source = f"{data.source} (from {init.path.name})"
    return words, source


def train(cfg: TrainConfig, data: ImageDataset, out: Path | str, *, resume: bool = False,
          latents: tuple[torch.Tensor, torch.Tensor] | None = None, vae=None, vae_dir: Path | None = None,
          text_encoder=None, hooks: tuple[Hook, ...] = (), init: DiffusionModel | None = None,
          device: str | None = None) -> Path:
    """Train a diffusion UNet on ``data`` and write a model folder to ``out``; returns ``out``.
    device: where it trains; None or "auto" takes this process's CUDA GPU when there is one (cuda:LOCAL_RANK
    under torchrun), else the CPU; "cuda" alone means cuda:LOCAL_RANK too (devices.resolve_device names the rest).

    data: anything with ``batch(indices, flips) -> (images, labels or None, captions or None)``, ``len``,
    ``channels``, ``class_names`` and ``infinite`` (read in order, never permuted: builtin:shapes).
    latents: (mean, std) of the VAE posterior for every image, (N, c, h, w) each, for latent diffusion
    (scaled already); a latent is drawn from them per step. For data too large to cache, pass ``vae``
    instead and each batch is encoded as it comes. vae_dir is copied into the run when it starts (beside the
    checkpoints, so each one exports whole).
    text_encoder: for text-conditional training (see imagine.models.text_encoders).
    init: a trained model to start from (a full fine-tune): its network, weights and noise schedule replace the
    preset's (cfg must already agree with it on what it was trained as; see recipe.fine_tune_config). The EMA
    starts from its weights too; a resumed run takes everything from its checkpoint."""
    out = Path(out)
    rank, world = _distributed()
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch size {cfg.batch_size} must divide evenly over {world} processes x "
                         f"{cfg.grad_accum} accumulation steps")
    if cfg.text_conditional and text_encoder is None:
        raise ValueError("text-conditional training needs a text encoder")
    if cfg.text_conditional and hasattr(text_encoder, "cache_size"):
        # captions repeat (builtin:shapes has ~60k distinct ones in 200k samples): encode each once
        text_encoder.cache_size = max(text_encoder.cache_size, 100_000)
    if cfg.class_conditional and data.num_classes < 2:
        raise ValueError(f"class-conditional training needs classes; {data.source} has none (for a folder, "
                         "put each class in a sub-folder and pass --classes)")
    device = training_device(device)
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    if latents is not None:
        item_shape = tuple(latents[0].shape[1:])
    elif vae is not None:
        f = vae.config.downscale
        item_shape = (vae.config.latent_channels, cfg.image_size // f, cfg.image_size // f)
    else:
        side = (cfg.sr_crop or cfg.image_size) if cfg.sr_scale > 1 else cfg.image_size
        item_shape = (data.channels, side, side)
    if cfg.sr_scale > 1 and (latents is not None or vae is not None):
        raise ValueError("super-resolution stages train in pixels: no VAE")
    channels = item_shape[0]
    context_dim = text_encoder.dim if cfg.text_conditional else None
    if cuda:  # the frozen encoders run beside the UNet (on the CPU they kept a GPU waiting)
        if vae is not None:
            vae.to(device)
        if cfg.text_conditional and hasattr(text_encoder, "prefill"):
            text_encoder.model.to(device)
    if init is None:
        unet = make_network(cfg, channels, data.num_classes, context_dim, side=item_shape[-1])
    else:
        have = init.unet.config
        if (have.in_channels, getattr(have, "cross_attention_dim", None) if context_dim else None) != (channels,
                                                                                                   context_dim):
            raise ValueError(f"--init {init.path}: its network takes {have.in_channels} channels and "
                             f"{have.cross_attention_dim}-wide text states; this run has {channels} and "
                             f"{context_dim}")
        unet = UNet2DConditionModel(have)
        unet.load_state_dict(init.unet.state_dict())
    unet = unet.to(device)
    ema = EMA(unet, cfg.ema_decay, cfg.ema_warmup)
    family = of_network(unet)  # what the network takes besides the text states (families/)
    latent_f = vae.config.downscale if vae is not None else (cfg.image_size // item_shape[-1] if latents is not None
                                                             else 1)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg))
    # a fine-tune keeps its model's noise schedule (and its own generation defaults) as it was trained
    spec = init.spec if init is not None else DiffusionSpec(
        schedule=cfg.schedule, prediction=cfg.prediction, learned_variance=cfg.learned_variance,
        flow_shift=cfg.flow_shift,
        image_size=cfg.image_size, image_channels=data.channels, latent=latents is not None or vae is not None,
        class_names=data.class_names if cfg.class_conditional else (),
        text_encoder=cfg.text_encoder if cfg.text_conditional else None, default_cfg=cfg.default_cfg,
        upscale=cfg.sr_scale, noise_levels=cfg.noise_levels if cfg.sr_scale > 1 else 0,
        default_noise_level=cfg.default_noise_level if cfg.sr_scale > 1 else 0)
    alphas_cumprod = spec.alphas_cumprod().float().to(device)
    # what a step draws and regresses (diffusion/objectives.py): VP timesteps and losses, or flow matching
    goal = objective(spec.prediction, alphas_cumprod, min_snr_gamma=cfg.min_snr_gamma,
                     learned_variance=spec.learned_variance, flow_density=cfg.flow_density)
    if cfg.sr_scale > 1 and spec.prediction == "flow":
        raise ValueError("super-resolution stages train on a VP schedule (their noise augmentation is VP's): "
                         "use prediction eps or v for them")
    start_step = 0
    if resume:
        ckpt = latest_checkpoint(out / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
        meta = load_checkpoint(ckpt, unet, ema, optimizer, lr_scheduler)
        if meta["unet_config"] != json.loads(json.dumps(asdict(unet.config))):
            raise ValueError("--resume with a different network than the checkpoint's; keep the same preset")
        start_step = meta["step"]
        # a run resumed with more steps follows its new schedule from here (the saved lr was the old one's)
        for group, base in zip(optimizer.param_groups, lr_scheduler.base_lrs, strict=True):
            group["lr"] = base * lr_factor(cfg, start_step)
    model = unet
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if cuda else None)
    log_path = out / "log.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_spec(spec, out)
        if cfg.text_conditional:
            words, source = training_vocabulary(data, init)
            save_vocabulary(out, words, source)
        _truncate_log(log_path, start_step)
        if vae_dir is not None and not (out / "vae").is_dir():  # beside the checkpoints: each one exports whole
            save_vae(load_vae(vae_dir), out / "vae")

    n = len(data)
    local = cfg.batch_size // (world * cfg.grad_accum)  # samples per process per micro-batch
    position = DataOrder(n, cfg.seed, getattr(data, "infinite", False))
    sample_prompts = data.batch(list(range(min(6, n))))[2] if cfg.text_conditional else None
    prefetch = None
    workers = int(os.environ.get("IMAGINE_DATA_WORKERS", min(8, (os.cpu_count() or 1) - 2)))
    if cuda and world == 1 and latents is None and getattr(data, "infinite", False) and workers >= 2:
        def plan(key: int) -> tuple[list[int], list[bool]]:  # key: step * grad_accum + micro
            first = (key // cfg.grad_accum) * cfg.batch_size + (key % cfg.grad_accum) * local
            counters = range(first, first + local)
            # the flips are the only draw the data needs; the loop draws the rest itself
            flips = [sample_draws(cfg.seed, c, len(alphas_cumprod), item_shape, True, 0.0)[2] for c in counters
                     ] if cfg.flip else [False] * local
            return [position(c) for c in counters], flips

        prefetch = Prefetcher(data, workers, plan, depth=2 * workers)
    step_time = time.perf_counter()
    try:
        for step in range(start_step, cfg.steps):
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # dropout inside the network
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                # global sample counters of this process's share of this micro-batch
                first = step * cfg.batch_size + micro * world * local + rank * local
                counters = range(first, first + local)
                idx, t, noise, flips, drop = [], [], [], [], []
                for c in counters:
                    idx.append(position(c))
                    draws = sample_draws(cfg.seed, c, len(alphas_cumprod), item_shape, cfg.flip, cfg.label_dropout,
                                         goal.draw_t)
                    for values, value in zip((t, noise, flips, drop), draws, strict=True):
                        values.append(value)
                if latents is not None:
                    eps = torch.stack([torch.randn(item_shape, generator=_sample_generator(cfg.seed + 1, c))
                                       for c in counters])
                    x0 = latents[0][idx] + latents[1][idx] * eps
                    labels, captions = data.labels[idx], getattr(data, "captions", None)
                    captions = [captions[i] for i in idx] if captions is not None else None
                elif prefetch is not None:
                    x0, labels, captions = prefetch.get(step * cfg.grad_accum + micro)
                    x0 = posterior_latents(vae, x0, cfg.seed + 1, counters, item_shape)
                else:
                    x0, labels, captions = data.batch(idx, torch.tensor(flips))
                    x0 = posterior_latents(vae, x0, cfg.seed + 1, counters, item_shape)  # encoded as it comes
                low = None
                if cfg.sr_scale > 1:
                    natives = None
                    if cfg.sr_native > 0:
                        if not hasattr(data, "render_at"):
                            raise ValueError("sr_native needs data that can draw its scenes small (builtin:shapes), "
                                             f"not {data.source}")
                        natives = data.render_at(idx, cfg.image_size // cfg.sr_scale)
                    x0, low, levels = sr_pairs(cfg, x0, counters, alphas_cumprod.cpu(), natives)
                x0, noise_t = x0.to(device), torch.stack(noise).to(device)
                if cfg.offset_noise:
                    g = _sample_generator(cfg.seed + 2, first)
                    noise_t = noise_t + cfg.offset_noise * torch.randn(local, channels, 1, 1, generator=g).to(device)
                t_t = goal.timesteps(t, device)
                x_t, network_t = goal.noisy(x0, noise_t, t_t)
                kwargs = {}
                if cfg.text_conditional:
                    if captions is None:
                        raise ValueError(f"{data.source} has no captions: give each image a .txt (or a metadata.jsonl)")
                    g_drop = [_sample_generator(cfg.seed + 3, c) for c in counters]
                    prompts = ["" if float(torch.rand(1, generator=g)) < cfg.caption_dropout else cap
                               for g, cap in zip(g_drop, captions, strict=True)]
                    if cuda and hasattr(text_encoder, "prefill"):
                        # the new captions in one batch: a GPU run's speed (its windows round with the batch they
                        # came in, so CPU runs, whose resume is bit-exact, encode each caption alone)
                        text_encoder.prefill(prompts)
                    text = text_encoder.encode(prompts)
                    if cfg.text_noise > 0:  # per sample, from its own stream: a resumed run draws the same
                        context = text.context
                        rms = context.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
                        noise = torch.stack([torch.randn(context.shape[1:], generator=_sample_generator(
                            cfg.seed + 5, c)) for c in counters])
                        text = replace(text, context=context + cfg.text_noise * rms * noise)
                    kwargs["encoder_hidden_states"] = text.context.to(device)
                    kwargs["encoder_attention_mask"] = text.mask.to(device)
                    # what the network's family takes besides (MMDiT: the pooled text; SDXL: its size ids)
                    extra = family.conditioning(text.pooled, item_shape[-1] * latent_f, item_shape[-1] * latent_f,
                                                text.context, text.mask)
                    kwargs.update({k: v.to(device) for k, v in extra.items()})
                if cfg.class_conditional:
                    labels = labels.clone()
                    if cfg.label_dropout > 0:
                        labels[torch.tensor(drop)] = data.num_classes  # the null class
                    kwargs["class_labels"] = labels.to(device)
                inputs = x_t
                if low is not None:
                    inputs = torch.cat([x_t, low.to(device)], dim=1)
                    if cfg.noise_levels:
                        kwargs["class_labels"] = levels.to(device)
                # DDP: all-reduce gradients only on the last micro-batch
                sync = world == 1 or micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if sync else model.no_sync():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                        output = model(inputs, network_t, **kwargs)
                    loss = goal.loss(output.float(), x0, noise_t, x_t, t_t)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach() / cfg.grad_accum
            if not torch.isfinite(loss_sum):
                raise FloatingPointError(f"loss became {loss_sum.item()} at step {step + 1}; lower --lr or use fp32")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            optimizer.step()
            lr_scheduler.step()
            ema.update(unet)
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            done = step + 1
            now = time.perf_counter()
            info = StepInfo(done, cfg.steps, float(loss_sum), optimizer.param_groups[0]["lr"],
                            cfg.batch_size / max(now - step_time, 1e-9), now - step_time)
            if rank == 0:
                if done % cfg.log_every == 0 or done == cfg.steps:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(asdict(info)) + "\n")
                context = {"unet": unet, "ema": ema, "spec": spec, "out": out, "config": cfg, "vae_dir": vae_dir,
                           "text_encoder": text_encoder, "sample_prompts": sample_prompts, "data": data}
                for hook in hooks:
                    hook(info, context)
                if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
                    save_checkpoint(out / "checkpoints", done, unet, ema, optimizer, lr_scheduler,
                                    {"unet_config": asdict(unet.config), "samples_seen": done * cfg.batch_size,
                                     "train_config": json.loads(json.dumps(asdict(cfg), default=str)),
                                     "init": str(init.path.absolute()) if init is not None else None},
                                    keep=cfg.keep_checkpoints)
            step_time = time.perf_counter()  # hooks and checkpoints do not count against images/s
    finally:
        if prefetch is not None:
            prefetch.close()
    if rank == 0:
        save_unet(ema.model, out / "unet")
    if world > 1:
        dist.barrier()
    return out


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint: the resumed run writes them again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]

    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def loss_curve(log: list[dict[str, Any]], path: Path) -> None:
    """A PNG of the loss against steps (raw and smoothed, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    losses = [r["loss"] for r in log]
    window = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, alpha=0.3, label="loss")
    ax.plot(steps, smooth, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if min(losses) > 0 and max(losses) / max(min(losses), 1e-12) > 10:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["StepInfo", "loss_curve", "make_unet_config", "read_log", "train"]
