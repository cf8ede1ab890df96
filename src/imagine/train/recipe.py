"""What `imagine train` runs: a preset plus flags become a dataset, maybe a VAE trained first, maybe
latents encoded once, and then the one training loop. The CLI only parses and prints."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from imagine.train.config import TrainConfig


def ensure_vae(cfg: TrainConfig, dataset, out: Path, hooks: Sequence = (), log: Callable[[str], None] = print) -> Path:
    """A latent preset with no VAE given: train one into OUT/vae_training, resuming a run that was cut
    short or that the preset now trains further (e.g. a decoder stage added after it finished)."""
    from imagine.train.checkpoint import checkpoint_step, latest_checkpoint
    from imagine.train.vae import train_vae, vae_preset

    folder = Path(out) / "vae_training"
    vcfg = vae_preset(cfg.vae_preset).with_overrides(image_size=cfg.image_size, seed=cfg.seed)
    total = vcfg.steps + vcfg.decoder_steps
    last = latest_checkpoint(folder / "checkpoints")
    done = checkpoint_step(last) if last is not None else 0
    if (folder / "model.safetensors").exists() and (last is None or done >= total):
        log(f"using the VAE trained earlier in {folder}")
        return folder
    log(f"no --vae given: training one first ({cfg.vae_preset}, {total} steps"
        f"{f', from step {done}' if done else ''}) in {folder}")
    train_vae(vcfg, dataset, folder, resume=last is not None, hooks=tuple(hooks))
    return folder


def train_model(cfg: TrainConfig, data: str, out: Path, *, channels: int = 3, vae: Path | None = None,
                resume: bool = False, hooks: Sequence = (), vae_hooks: Sequence = (),
                log: Callable[[str], None] = print) -> None:
    """Train a diffusion model on ``data`` (a folder, builtin:digits or builtin:shapes) into ``out``: in
    pixels, or in the latents of ``vae`` (trained first when the preset names one and none is given)."""
    from imagine.data.images import load_dataset
    from imagine.train.loop import train

    is_digits = data == "builtin:digits"
    dataset = load_dataset(data, cfg.image_size, channels, class_from_subfolders=cfg.class_conditional
                           and not is_digits, captions=cfg.text_conditional)
    text_encoder = None
    if cfg.text_conditional:
        from imagine.models.text_encoders import load_text_encoder

        text_encoder = load_text_encoder(cfg.text_encoder)
    if vae is None and cfg.vae_preset is not None:
        vae = ensure_vae(cfg, dataset, out, vae_hooks, log)
    latents, autoencoder = None, None
    if vae is not None:
        from imagine.models import load_vae
        from imagine.train.vae import encode_dataset

        autoencoder = load_vae(vae)
        if cfg.image_size % autoencoder.config.downscale:
            raise ValueError(f"image size {cfg.image_size} is not a multiple of the VAE's factor "
                             f"{autoencoder.config.downscale}")
        if autoencoder.config.in_channels != dataset.channels:
            raise ValueError(f"the VAE takes {autoencoder.config.in_channels}-channel images, the data has "
                             f"{dataset.channels}: pass --channels {autoencoder.config.in_channels}")
        if not getattr(dataset, "infinite", False):
            latents = encode_dataset(autoencoder, dataset)
    train(cfg, dataset, out, resume=resume, latents=latents, vae_dir=vae, text_encoder=text_encoder,
          vae=autoencoder if (vae is not None and latents is None) else None, hooks=tuple(hooks))
