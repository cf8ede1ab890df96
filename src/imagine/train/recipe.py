"""What `imagine train` runs: a preset plus flags become a dataset, maybe a VAE trained first, maybe
latents encoded once, and then the one training loop. The CLI only parses and prints."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from imagine.data.images import load_dataset
from imagine.io.checkpoint import atomic_write_bytes
from imagine.io.model_folder import CASCADE, load_model_folder
from imagine.io.networks import load_vae
from imagine.models.text_encoders import load_text_encoder
from imagine.train.checkpoint import checkpoint_meta, checkpoint_step, latest_checkpoint
from imagine.train.config import TrainConfig
from imagine.train.loop import train
from imagine.train.vae import encode_dataset, train_vae, vae_preset


def ensure_vae(cfg: TrainConfig, dataset, out: Path, hooks: Sequence = (), log: Callable[[str], None] = print,
               device: str | None = None) -> Path:
    """A latent preset with no VAE given: train one into OUT/vae_training, resuming a run that was cut
    short or that the preset now trains further (e.g. a decoder stage added after it finished)."""
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
    train_vae(vcfg, dataset, folder, resume=last is not None, hooks=tuple(hooks), device=device)
    return folder


def fine_tune_config(cfg: TrainConfig, spec) -> TrainConfig:
    """The settings of a run that starts from a trained model (``--init``): what the model was trained as
    (parametrization, variance, image size, text or classes) is the model's, whatever the preset says; the
    optimization (steps, batch, learning rate, data) is the preset's and the flags'."""
    if spec.upscale > 1 or spec.consistency:
        raise ValueError("--init takes a text-to-image or unconditional model; super-resolution stages and LCMs "
                         "have their own trainers (train-sr, distill-lcm)")
    return replace(cfg, schedule=spec.schedule, prediction=spec.prediction, learned_variance=spec.learned_variance,
                   image_size=spec.image_size, text_conditional=spec.text_encoder is not None,
                   text_encoder=spec.text_encoder or cfg.text_encoder, class_conditional=bool(spec.class_names),
                   vae_preset=None, default_cfg=spec.default_cfg)


def train_model(cfg: TrainConfig, data: str, out: Path, *, channels: int = 3, vae: Path | None = None,
                resume: bool = False, hooks: Sequence = (), vae_hooks: Sequence = (),
                log: Callable[[str], None] = print, init: Path | None = None, device: str | None = None) -> None:
    """Train a diffusion model on ``data`` (a folder, builtin:digits or builtin:shapes) into ``out``: in
    pixels, or in the latents of ``vae`` (trained first when the preset names one and none is given).
    ``init``: an imagine model folder to start from (a full fine-tune; its VAE too unless ``vae`` is given).
    ``device``: where both train (loop.training_device: "auto" takes this process's GPU when there is one)."""
    base = None
    if resume and init is None:  # a fine-tune resumed goes on from the model it started from
        last = latest_checkpoint(Path(out) / "checkpoints")
        started = checkpoint_meta(last).get("init") if last is not None else None
        if started is not None:
            if not Path(started).is_dir():
                raise FileNotFoundError(f"{out} is a fine-tune of {started}, which is gone: pass --init with that "
                                        "model (its network and VAE) to resume it")
            init = Path(started)
    if init is not None:
        base = load_model_folder(init)
        cfg = fine_tune_config(cfg, base.spec)
        if base.spec.latent and vae is None:
            vae = Path(init) / "vae"
        if not base.spec.latent and vae is not None:
            raise ValueError(f"--init {init} is a pixel-space model: it takes no --vae")
        log(f"starting from {init} ({sum(p.numel() for p in base.unet.parameters()) / 1e6:.1f}M parameters, "
            f"{base.spec.prediction}-prediction, {base.spec.image_size} px)")
    is_digits = data == "builtin:digits"
    dataset = load_dataset(data, cfg.image_size, channels, class_from_subfolders=cfg.class_conditional
                           and not is_digits, captions=cfg.text_conditional)
    text_encoder = None
    if cfg.text_conditional:
        text_encoder = load_text_encoder(cfg.text_encoder)
    if vae is None and cfg.vae_preset is not None:
        vae = ensure_vae(cfg, dataset, out, vae_hooks, log, device)
    latents, autoencoder = None, None
    if vae is not None:
        autoencoder = load_vae(vae)
        if cfg.image_size % autoencoder.config.downscale:
            raise ValueError(f"image size {cfg.image_size} is not a multiple of the VAE's factor "
                             f"{autoencoder.config.downscale}")
        if autoencoder.config.in_channels != dataset.channels:
            raise ValueError(f"the VAE takes {autoencoder.config.in_channels}-channel images, the data has "
                             f"{dataset.channels}: pass --channels {autoencoder.config.in_channels}")
        if not getattr(dataset, "infinite", False):
            latents = encode_dataset(autoencoder, dataset)
    if base is not None and cfg.class_conditional and tuple(dataset.class_names) != tuple(base.spec.class_names):
        raise ValueError(f"--init {init} knows the classes {list(base.spec.class_names)}, the data has "
                         f"{list(dataset.class_names)}: fine-tune on data with the same classes")
    train(cfg, dataset, out, resume=resume, latents=latents, vae_dir=vae, text_encoder=text_encoder,
          vae=autoencoder if (vae is not None and latents is None) else None, hooks=tuple(hooks), init=base,
          device=device)




def sr_stage_sizes(start: int, end: int, stages: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """The (from, to) size of each stage: one stage start -> end, or the steps of ``stages`` (which must begin
    at start and end at end), each a whole factor >= 2."""
    sizes = list(stages) if stages else [start, end]
    if sizes[0] != start or sizes[-1] != end:
        raise ValueError(f"--stages {','.join(map(str, sizes))} must run from --from {start} to --to {end}")
    pairs = list(itertools.pairwise(sizes))
    for a, b in pairs:
        if a < 1 or b % a or b // a < 2:
            raise ValueError(f"a stage {a} -> {b} is not a whole factor of 2 or more; choose sizes like 64,128,256")
    return pairs


def train_sr(cfg: TrainConfig, data: str, out: Path, pairs: list[tuple[int, int]], *, resume: bool = False,
             hooks: Sequence = (), log: Callable[[str], None] = print, device: str | None = None) -> list[Path]:
    """Train one super-resolution stage per (from, to) pair, in order, on ``data`` rendered at each stage's
    target size: OUT itself for one stage, else OUT/stage-FROM-TO per stage and OUT/cascade.json naming them
    in order (``--sr OUT`` then runs the whole cascade). On --resume a finished stage is kept and the first
    unfinished one goes on from its last checkpoint."""
    out = Path(out)
    folders = [out] if len(pairs) == 1 else [out / f"stage-{a}-{b}" for a, b in pairs]
    if not resume and any(f.exists() and any(f.iterdir()) for f in folders):
        raise FileExistsError(f"{out} already holds a training run: pass --resume to go on with it, or choose "
                              "another --out")
    for (a, b), folder in zip(pairs, folders, strict=True):
        stage_cfg = cfg.with_overrides(image_size=b, sr_scale=b // a, sr_crop=min(cfg.sr_crop or b, b))
        if resume and (folder / "unet").is_dir() and _finished(folder, stage_cfg.steps):
            log(f"stage {a} -> {b}: finished earlier in {folder}")
            continue
        again = resume and latest_checkpoint(folder / "checkpoints") is not None
        log(f"stage {a} -> {b} ({b // a}x){' from its last checkpoint' if again else ''}: {folder}")
        train_model(stage_cfg, data, folder, resume=again, hooks=hooks, log=log, device=device)
    if len(pairs) > 1:
        manifest = {"stages": [f.name for f in folders], "sizes": [list(p) for p in pairs]}
        atomic_write_bytes(out / CASCADE, json.dumps(manifest, indent=2).encode())
    return folders


def _finished(folder: Path, steps: int) -> bool:
    last = latest_checkpoint(folder / "checkpoints")
    return last is not None and checkpoint_step(last) >= steps
