"""Training the KL autoencoder (Rombach et al. 2022, Appendix G): L1 + MSE reconstruction plus a small
KL weight toward N(0, I). When done, the latent scaling factor is set to 1 / std of the training
latents, so diffusion sees unit-variance data (what SD's 0.18215 is for its VAE).

An optional second stage trains the decoder alone with the encoder frozen, as Stability's ft-MSE / ft-EMA
decoders did for SD 1.x: sharper images from the same latent space, so a UNet trained on the first
stage's latents needs nothing retrained.

Like the UNet loop, every random draw is a function of (seed, step), so a resumed run is exact.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from imagine.data.images import ImageDataset
from imagine.io.networks import save_vae
from imagine.models import AutoencoderKL, VAEConfig
from imagine.train.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint, save_checkpoint
from imagine.train.loop import DataOrder, StepInfo, _truncate_log, training_device


@dataclass(frozen=True)
class VAETrainConfig:
    image_size: int = 32
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    kl_weight: float = 1e-4
    mse_weight: float = 1.0
    decoder_steps: int = 0  # then this many steps on the decoder alone, the encoder (latent space) frozen
    decoder_lr: float = 3e-4  # constant for half the decoder steps, then linear to 0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    vae: dict[str, Any] = field(default_factory=lambda: dict(block_out_channels=(32, 64), layers_per_block=1,
                                                             latent_channels=4, norm_num_groups=8))

    def with_overrides(self, **overrides: Any) -> VAETrainConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


VAE_PRESETS = {
    "vae-tiny": VAETrainConfig(image_size=16, steps=20, batch_size=8, checkpoint_every=10, log_every=1,
                               vae=dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=2,
                                        norm_num_groups=4)),
    "vae-small": VAETrainConfig(),
    # factor-4 VAE for 64x64 scenes (16x16x4 latents), for text-to-image on builtin:shapes. After 1,500
    # steps it rounds corners (squares read as circles, stars as triangles: ShapesEval of its
    # reconstructions 0.55); the decoder stage sharpens them in the same latent space.
    "vae-shapes": VAETrainConfig(image_size=64, steps=1500, batch_size=8, lr=1e-3, checkpoint_every=250,
                                 decoder_steps=4000,
                                 vae=dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
                                          norm_num_groups=8)),
}


def _stage_optimizer(vae: AutoencoderKL, cfg: VAETrainConfig, decoder_stage: bool):
    """Stage 1: everything, AdamW at cfg.lr (betas as in VQGAN). Stage 2: the decoder side only, its
    learning rate constant for half the stage, then decaying linearly to 0."""
    if not decoder_stage:
        optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for frozen in (*vae.encoder.parameters(), *vae.quant_conv.parameters()):
        frozen.requires_grad_(False)
        frozen.grad = None  # stage 1's last gradient must not count in stage 2's clipping norm
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.decoder_lr, betas=(0.9, 0.99), weight_decay=0.0)
    n = cfg.decoder_steps
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, 2.0 * (n - s) / n))


def vae_preset(name: str) -> VAETrainConfig:
    if name not in VAE_PRESETS:
        raise ValueError(f"VAE preset {name!r} unknown; choose one of: {', '.join(VAE_PRESETS)}")
    return VAE_PRESETS[name]


def train_vae(cfg: VAETrainConfig, data: ImageDataset, out: Path | str, *, resume: bool = False,
              hooks: tuple = (), device: str | None = None) -> Path:
    """Train an AutoencoderKL on ``data`` into ``out`` (resumable); ``device`` as loop.training_device takes it
    (its posterior's noise is drawn by CPU generators on any device)."""
    out = Path(out)
    device = training_device(device)
    torch.manual_seed(cfg.seed)
    vae_cfg = VAEConfig.from_dict({**cfg.vae, "in_channels": data.channels,
                                   "out_channels": data.channels, "sample_size": cfg.image_size})
    vae = AutoencoderKL(vae_cfg).to(device)
    total = cfg.steps + cfg.decoder_steps
    ckpt = latest_checkpoint(out / "checkpoints") if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    optimizer, lr_scheduler = _stage_optimizer(vae, cfg, ckpt is not None and checkpoint_step(ckpt) > cfg.steps)
    start = 0 if ckpt is None else load_checkpoint(ckpt, vae, None, optimizer, lr_scheduler)["step"]
    out.mkdir(parents=True, exist_ok=True)
    _truncate_log(out / "log.jsonl", start)
    position, tick = DataOrder(len(data), cfg.seed, getattr(data, "infinite", False)), time.perf_counter()
    for step in range(start, total):
        if step == cfg.steps and cfg.decoder_steps:  # stage 2 begins: the latent space is fixed from here on
            optimizer, lr_scheduler = _stage_optimizer(vae, cfg, True)
        first = step * cfg.batch_size
        idx = [position(c) for c in range(first, first + cfg.batch_size)]
        x, _, _ = data.batch(idx)
        x = x.to(device)
        with torch.set_grad_enabled(step < cfg.steps):
            posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)))
        rec = (recon - x).abs().mean() + cfg.mse_weight * (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + cfg.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        lr_scheduler.step()
        done, now = step + 1, time.perf_counter()
        info = StepInfo(done, total, loss.item(), lr, cfg.batch_size / max(now - tick, 1e-9), now - tick)
        if done % cfg.log_every == 0 or done == total:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(asdict(info)) + "\n")
        for hook in hooks:
            hook(info, {})
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done in (cfg.steps, total):
            save_checkpoint(out / "checkpoints", done, vae, None, optimizer, lr_scheduler,
                            {"vae_config": asdict(vae.config)})
        tick = time.perf_counter()
    vae.eval()
    with torch.no_grad():  # the scaling factor from (up to) the first 2048 items
        sample = range(min(len(data), 2048))
        latents = torch.cat([vae.encode(data.batch(list(sample[i:i + 64]))[0].to(device)).mean.cpu()
                             for i in range(0, len(sample), 64)])
    scaled = replace(vae.config, scaling_factor=float(1.0 / latents.std()), shift_factor=float(latents.mean()))
    final = AutoencoderKL(scaled)
    final.load_state_dict(vae.state_dict())
    save_vae(final, out)
    return out


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, data: ImageDataset, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latent mean and std of every image, (N, c, h, w) each: the latents are cached once and a
    sample is drawn per training step."""
    vae.eval()
    means, stds = [], []
    for x in data.images.split(batch):
        posterior = vae.encode(x)
        means.append(vae.to_latent(posterior.mean))
        stds.append(posterior.std * vae.config.scaling_factor)
    return torch.cat(means), torch.cat(stds)
