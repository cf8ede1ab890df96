"""imagine train, train-vae, train-clip, train-lora, dreambooth."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer

from imagine.cli.app import TRAIN, app, fail, training_progress


@app.command(rich_help_panel=TRAIN)
def train(
    data: str | None = typer.Option(None, help="A folder of images, builtin:digits or builtin:shapes (default: the "
                                               "preset's, e.g. shapes-default trains on builtin:shapes)."),
    out: Path = typer.Option(..., help="Where the model folder (and checkpoints, samples, logs) goes."),
    preset: str = typer.Option("small", help="Settings to start from: tiny (seconds), small, digits, t2i, "
                                             "shapes-default then shapes-language --init (the shipped model's "
                                             "two stages), shapes-wide (a GPU job), tiny-t2i."),
    steps: int | None = typer.Option(None, help="Total steps; a resumed run trains on to this count."),
    batch_size: int | None = typer.Option(None, help="Global batch size, over all processes."),
    lr: float | None = typer.Option(None, help="Peak learning rate (AdamW)."),
    image_size: int | None = typer.Option(None, help="Images are resized and center-cropped to this."),
    classes: bool | None = typer.Option(None, "--classes/--no-classes",
                                        help="Class-conditional, classes from sub-folder names (on for digits)."),
    channels: int = typer.Option(3, help="Image channels for folder data: 3 (RGB) or 1 (grey)."),
    caption_dropout: float | None = typer.Option(None, help="Text models: train on the empty prompt this often."),
    text_noise: float | None = typer.Option(None, help="Text models: Gaussian noise on the text states in training, "
                                                     "times their RMS (an augmentation for unseen phrasings)."),
    flip: bool | None = typer.Option(None, "--flip/--no-flip", help="Random horizontal flips."),
    precision: str | None = typer.Option(None, help="fp32, or bf16 autocast with fp32 master weights."),
    arch: str | None = typer.Option(None, help="The denoiser: unet; dit (a diffusion transformer with adaLN-Zero, "
                                               "class-conditional); pixart (a DiT cross-attending to the text, "
                                               "adaLN-single), mmdit (SD3's joint text-image attention) or "
                                               "flux (double- then single-stream blocks, rotary positions)."),
    prediction: str | None = typer.Option(None, help="eps, v or x0 on the VP schedule, or flow (rectified flow: "
                                                   "the network predicts eps - x0 on x_t = (1 - t) x0 + t eps)."),
    flow_density: str | None = typer.Option(None, help="prediction flow: where training times fall: logit_normal "
                                                       "(SD3's choice, the default), uniform or mode."),
    flow_shift: float | None = typer.Option(None, help="prediction flow: the sampling shift the model records "
                                                       "(1: none; SD3 uses 3 for 1024 px)."),
    schedule: str | None = typer.Option(None, help="linear, scaled_linear, cosine or sigmoid."),
    min_snr_gamma: float | None = typer.Option(None, help="Min-SNR-gamma loss weighting (e.g. 5)."),
    offset_noise: float | None = typer.Option(None, help="Offset-noise strength (e.g. 0.1)."),
    learned_variance: bool | None = typer.Option(None, "--learned-variance/--fixed-variance",
                                                 help="Learn the variance (improved DDPM's hybrid loss)."),
    grad_accum: int | None = typer.Option(None, help="Gradient accumulation steps."),
    checkpoint_every: int | None = typer.Option(None, help="Save full training state every N steps."),
    sample_every: int | None = typer.Option(None, help="Write a sample grid every N steps (0: never)."),
    seed: int | None = typer.Option(None, help="Seed of every random draw of the run."),
    vae: Path | None = typer.Option(None, help="A VAE folder (from train-vae, or diffusers'): train in its latents."),
    device: str = typer.Option("auto", "--device", help="Where it trains: auto (a CUDA GPU, then Apple's MPS, then "
                                                         "the CPU), cpu, cuda, cuda:N or mps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    init: Path | None = typer.Option(None, help="Start from this trained model folder (a full fine-tune): its "
                                                "network, weights, noise schedule and VAE; the preset and flags "
                                                "set the data and the optimization."),
) -> None:
    """Train a diffusion model on a folder of images or a built-in dataset (in pixels, or in a VAE's latents)."""
    from imagine.data.images import DataError
    from imagine.io.checkpoint import CheckpointError
    from imagine.train.config import preset as get_preset
    from imagine.train.hooks import sample_grid_hook
    from imagine.train.loop import _distributed, loss_curve, read_log
    from imagine.train.recipe import train_model

    rank, _ = _distributed()
    progress = training_progress()
    hooks = [] if rank else [progress, sample_grid_hook()]
    vae_progress = training_progress()
    try:
        cfg = get_preset(preset)
        data = data or cfg.data
        if data is None:
            raise ValueError(f"preset {preset!r} has no dataset of its own: pass --data FOLDER (or builtin:digits)")
        cfg = cfg.with_overrides(
            steps=steps, batch_size=batch_size, lr=lr, image_size=image_size, precision=precision,
            prediction=prediction, schedule=schedule, grad_accum=grad_accum, checkpoint_every=checkpoint_every,
            min_snr_gamma=min_snr_gamma, offset_noise=offset_noise, learned_variance=learned_variance,
            flow_density=flow_density, flow_shift=flow_shift, arch=arch,
            sample_every=sample_every, seed=seed, flip=flip,
            class_conditional=classes if classes is not None else (data == "builtin:digits" or None),
            caption_dropout=caption_dropout, text_noise=text_noise)
        if cfg.prediction == "flow" and min_snr_gamma is None:  # a preset's min-SNR weighting is VP's
            cfg = replace(cfg, min_snr_gamma=None)
        train_model(cfg, data, out, channels=channels, vae=vae, resume=resume, hooks=hooks,
                    vae_hooks=[] if rank else [vae_progress], log=typer.echo if rank == 0 else lambda _: None,
                    init=init, device=device)
    except (ValueError, DataError, FileNotFoundError, FloatingPointError, CheckpointError) as err:
        fail(str(err))
    finally:
        vae_progress(None, {})
        progress(None, {})
    if rank == 0:
        loss_curve(read_log(out / "log.jsonl"), out / "loss.png")
        typer.echo(f"model written to {out} (loss curve: {out / 'loss.png'})")


@app.command("train-sr", rich_help_panel=TRAIN)
def train_sr_command(
    out: Path = typer.Option(..., help="The stage's model folder; with --stages, a folder of stage-FROM-TO folders "
                                       "and cascade.json (use it whole with --sr)."),
    data: str = typer.Option("builtin:shapes", help="builtin:shapes, or a folder of captioned images (.txt beside "
                                                   "each) at least --to pixels on a side."),
    from_size: int = typer.Option(64, "--from", help="The low resolution the stage starts from."),
    to_size: int = typer.Option(256, "--to", help="The resolution it makes."),
    stages: str | None = typer.Option(None, help="A cascade's sizes, e.g. 64,128,256: one stage per step, trained "
                                                 "in order (default: one stage --from -> --to)."),
    preset: str = typer.Option("sr", help="sr (the shipped stage's recipe) or tiny-sr (seconds)."),
    steps: int | None = typer.Option(None, help="Steps per stage; a resumed run trains on to this count."),
    batch_size: int | None = typer.Option(None, help="Crops per step."),
    lr: float | None = typer.Option(None, help="Peak learning rate (AdamW)."),
    crop: int | None = typer.Option(None, help="Train on random crops of this size of the target (0: whole "
                                               "images; the network is convolutional either way)."),
    noise_levels: int | None = typer.Option(None, help="Noise-augmentation levels the stage learns (0..N-1)."),
    noise_level: int | None = typer.Option(None, help="The level generation uses unless told (diffusion.json)."),
    precision: str | None = typer.Option(None, help="fp32, or bf16 autocast with fp32 master weights."),
    checkpoint_every: int | None = typer.Option(None, help="Save full training state every N steps."),
    sample_every: int | None = typer.Option(None, help="Write an input | output | truth grid every N steps."),
    seed: int | None = typer.Option(None, help="Seed of every random draw of the run."),
    native: float | None = typer.Option(None, help="Share of pairs whose input is the scene drawn small by the "
                                        "renderer (builtin:shapes), not the target degraded."),
    resume: bool = typer.Option(False, "--resume", help="Go on from the last checkpoint (finished stages are kept)."),
    device: str = typer.Option("auto", "--device", help="Where it trains: auto (a CUDA GPU, then Apple's MPS, then "
                                                         "the CPU), cpu, cuda, cuda:N or mps."),
) -> None:
    """Train super-resolution diffusion stages (Imagen): text-conditioned, on the low-resolution image with
    noise-conditioning augmentation, Efficient U-Net, in pixels."""
    from imagine.data.images import DataError
    from imagine.train.config import preset as get_preset
    from imagine.train.hooks import sample_grid_hook
    from imagine.train.loop import loss_curve, read_log
    from imagine.train.recipe import sr_stage_sizes, train_sr

    progress = training_progress()
    try:
        cfg = get_preset(preset)
        if cfg.sr_scale < 2:
            raise ValueError(f"preset {preset!r} is not a super-resolution preset; use sr or tiny-sr")
        pairs = sr_stage_sizes(from_size, to_size, [int(v) for v in stages.split(",")] if stages else None)
        cfg = cfg.with_overrides(steps=steps, batch_size=batch_size, lr=lr, sr_crop=crop, noise_levels=noise_levels,
                                 default_noise_level=noise_level, precision=precision, seed=seed,
                                 checkpoint_every=checkpoint_every, sample_every=sample_every, sr_native=native)
        folders = train_sr(cfg, data, out, pairs, resume=resume, hooks=[progress, sample_grid_hook()],
                           log=typer.echo, device=device)
    except (ValueError, DataError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        fail(str(err))
    finally:
        progress(None, {})
    for folder in folders:
        loss_curve(read_log(folder / "log.jsonl"), folder / "loss.png")
    typer.echo(f"super-resolution {'cascade' if len(folders) > 1 else 'stage'} written to {out} (samples: "
               f"{folders[-1] / 'samples'}); use it with imagine upscale IMAGE --upscaler {out} or imagine "
               f"generate PROMPT --sr {out}")


@app.command("train-vae", rich_help_panel=TRAIN)
def train_vae_command(
    data: str = typer.Option(..., help="A folder of images, or builtin:digits."),
    out: Path = typer.Option(..., help="Where the VAE folder goes."),
    preset: str = typer.Option("vae-small", help="vae-tiny (seconds) or vae-small."),
    steps: int | None = typer.Option(None, help="Total steps."),
    batch_size: int | None = typer.Option(None, help="Batch size."),
    lr: float | None = typer.Option(None, help="Learning rate."),
    image_size: int | None = typer.Option(None, help="Images are resized and center-cropped to this."),
    channels: int = typer.Option(3, help="Image channels for folder data: 3 or 1."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    device: str = typer.Option("auto", "--device", help="Where it trains: auto (a CUDA GPU, then Apple's MPS, then "
                                                         "the CPU), cpu, cuda, cuda:N or mps."),
) -> None:
    """Train the KL autoencoder that latent diffusion runs in (reconstruction + KL)."""
    from imagine.data.images import DataError, load_dataset
    from imagine.train.loop import loss_curve, read_log
    from imagine.train.vae import train_vae, vae_preset

    hook = training_progress()
    try:
        cfg = vae_preset(preset).with_overrides(steps=steps, batch_size=batch_size, lr=lr, image_size=image_size)
        dataset = load_dataset(data, cfg.image_size, channels)
        train_vae(cfg, dataset, out, resume=resume, hooks=(hook,), device=device)
    except (ValueError, DataError, FileNotFoundError) as err:
        fail(str(err))
    finally:
        hook(None, {})
    loss_curve(read_log(out / "log.jsonl"), out / "loss.png")
    typer.echo(f"VAE written to {out}")


@app.command("train-clip", rich_help_panel=TRAIN)
def train_clip_command(
    out: Path = typer.Option(..., help="Where the CLIP model folder goes (config.json, model.safetensors, eval.json)."),
    preset: str = typer.Option("shapes-clip", help="shapes-clip (the shipped scorer) or tiny (seconds)."),
    steps: int | None = typer.Option(None, help="Training steps."),
    seed: int | None = typer.Option(None, help="Seed of the scenes and the run."),
    device: str = typer.Option("auto", "--device", help="Where it trains: auto (a CUDA GPU, then Apple's MPS, then "
                                                         "the CPU), cpu, cuda, cuda:N or mps."),
) -> None:
    """Train the CLIP-style scorer on builtin:shapes and report its zero-shot retrieval on held-out scenes."""
    from dataclasses import replace

    from tqdm import tqdm

    from imagine.models.text_encoders import default_text_encoder
    from imagine.train.clip import CLIP_PRESETS, train_clip

    if preset not in CLIP_PRESETS:
        fail(f"preset {preset!r} unknown; choose one of: {', '.join(CLIP_PRESETS)}")
    cfg = CLIP_PRESETS[preset]
    cfg = replace(cfg, **{k: v for k, v in {"steps": steps, "seed": seed}.items() if v is not None})
    bar = tqdm(total=cfg.steps, desc="train-clip", unit="step")

    def progress(step, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        metrics = train_clip(cfg, out, default_text_encoder(), progress, device=device)
    except ValueError as err:
        bar.close()
        fail(str(err))
    bar.close()
    typer.echo(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))
    typer.echo(f"CLIP model written to {out}")


# options every adapter training (train-lora, textual-inversion) takes alike
_ADAPTER = dict(
    steps=typer.Option(500, help="Optimizer steps (a resumed run trains on to this count)."),
    batch_size=typer.Option(4, help="Images per step."),
    seed=typer.Option(0, help="Seed of every random draw of the run."),
    flip=typer.Option(False, "--flip/--no-flip", help="Random horizontal flips."),
    precision=typer.Option("fp32", help="fp32, or bf16 autocast."),
    checkpoint_every=typer.Option(100, help="Save the training state every N steps."),
    device=typer.Option("auto", "--device", help="Where it trains: auto (a CUDA GPU, then Apple's MPS, then the "
                                                 "CPU), cpu, cuda, cuda:N or mps. The random draws are the CPU's "
                                                 "on any device."),
)


def _adapter_written(out: Path, path: Path, what: str) -> None:
    """After an adapter run (LoRA, DreamBooth, textual inversion): the loss plot, and where everything is."""
    from imagine.train.loop import loss_curve, read_log
    from imagine.train.lora import checkpoint_dir

    root = checkpoint_dir(out)
    log = read_log(root / "log.jsonl")
    if log:
        loss_curve(log, root / "loss.png")
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    typer.echo(f"wrote {path} ({size / 1e6:.2f} MB); {what} in {root}")


@app.command("train-lora", rich_help_panel=TRAIN)
def train_lora(
    model: str = typer.Option(..., help="The base model: an imagine or diffusers folder, an SD .safetensors or a "
                                        "name in the models folder (the shipped one: pass its path)."),
    data: str = typer.Option(..., help="Captioned images: a folder with same-name .txt files or metadata.jsonl, or "
                                       "builtin:shapes."),
    out: Path = typer.Option(..., help="The LoRA file to write (.safetensors, kohya's layout); checkpoints, log, "
                                       "loss plot and sample grids go to OUT-training/ beside it."),
    rank: int = typer.Option(4, help="Rank r of the update B A."),
    alpha: float | None = typer.Option(None, help="Scale numerator: the update is (alpha / r) B A (default: r)."),
    targets: str = typer.Option("attn", help="UNet layers: attn (q, k, v, out), attn+ff, or all (convs too)."),
    algo: str = typer.Option("lora", help="lora, locon (LoRA on every layer, convs too), loha (LyCORIS's "
                                          "Hadamard product), lokr (Kronecker product) or dora (weight-decomposed); "
                                          "written in LyCORIS's layout, which A1111, ComfyUI and Forge read."),
    text_encoder: bool = typer.Option(False, "--text-encoder", help="Also train the text encoder's attention."),
    steps: int = _ADAPTER["steps"],
    batch_size: int = _ADAPTER["batch_size"],
    lr: float = typer.Option(1e-4, help="AdamW learning rate."),
    seed: int = _ADAPTER["seed"],
    flip: bool = _ADAPTER["flip"],
    precision: str = _ADAPTER["precision"],
    device: str = _ADAPTER["device"],
    checkpoint_every: int = _ADAPTER["checkpoint_every"],
    sample_every: int = typer.Option(0, help="Write a sample grid every N steps (0: only at the end when "
                                             "--sample-prompt is given)."),
    sample_prompt: list[str] = typer.Option(None, "--sample-prompt", help="A prompt for the sample grids; repeat."),
    models_dir: Path | None = typer.Option(None, help="A1111-style models folder (default: ./models)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT-training/."),
) -> None:
    """Train a LoRA on a frozen model: only the low-rank updates learn, starting from the model itself."""
    from imagine.data.images import DataError, load_dataset
    from imagine.io import models_dir as md
    from imagine.io.checkpoint import CheckpointError
    from imagine.pipelines.request import load_text_model
    from imagine.train.lora import LoraTrainConfig, lora_sample_hook
    from imagine.train.lora import train_lora as run

    progress = training_progress()
    try:
        cfg = LoraTrainConfig(rank=rank, alpha=alpha, targets=targets, text_encoder=text_encoder, steps=steps,
                              batch_size=batch_size, lr=lr, seed=seed, flip=flip, precision=precision,
                              checkpoint_every=checkpoint_every, algo=algo)
        folder = models_dir if models_dir is not None else md.default_models_dir()
        loaded, encoder = load_text_model(md.resolve(model, folder))
        dataset = load_dataset(data, loaded.spec.image_size, loaded.spec.image_channels, captions=True)
        hooks = [progress, lora_sample_hook(list(sample_prompt or []), sample_every or steps)]
        path = run(loaded, encoder, dataset, cfg, out, resume=resume, hooks=tuple(hooks), device=device)
    except (ValueError, CheckpointError, FileNotFoundError, DataError) as err:
        progress(None, None)
        fail(str(err))
    progress(None, None)
    _adapter_written(out, path, "log, loss plot and samples")


@app.command(rich_help_panel=TRAIN)
def dreambooth(
    model: str = typer.Option(..., help="The base model: a folder, an SD .safetensors or a name in the models folder."),
    instance_data: Path = typer.Option(..., help="A few images of the subject (3 to 5 is typical); a same-name "
                                                 ".txt beside an image is its own prompt (write the rare word in it)."),
    instance_prompt: str = typer.Option(..., help='The prompt naming the subject with a rare word: "a sks shape" '
                                                  '(for images without a .txt).'),
    class_prompt: list[str] = typer.Option(None, help='The class without the word: "a shape" (prior preservation); '
                                                      'repeat for several (the class images cycle through them).'),
    prior_weight: float = typer.Option(1.0, help="Weight of the class-prior loss (0: no prior preservation)."),
    num_class_images: int = typer.Option(100, help="Class images the base model draws (cached in OUT-training/)."),
    out: Path = typer.Option(..., help="The LoRA file to write (.safetensors); with --full the model (a "
                                       ".safetensors single file, or a folder of the base's kind)."),
    lora: int = typer.Option(4, "--lora", help="The LoRA's rank."),
    full: bool = typer.Option(False, "--full", help="Fine-tune every UNet weight instead of a LoRA (the paper's "
                                                    "DreamBooth; writes a whole model)."),
    targets: str = typer.Option("attn", help="UNet layers: attn, attn+ff or all."),
    algo: str = typer.Option("lora", help="lora, locon (LoRA on every layer, convs too), loha (LyCORIS's "
                                          "Hadamard product), lokr (Kronecker product) or dora (weight-decomposed); "
                                          "written in LyCORIS's layout, which A1111, ComfyUI and Forge read."),
    text_encoder: bool = typer.Option(False, "--text-encoder", help="Also train the text encoder's attention."),
    steps: int = typer.Option(400, help="Optimizer steps."),
    batch_size: int = typer.Option(2, help="Instance images per step (and as many class images)."),
    lr: float | None = typer.Option(None, help="AdamW learning rate (default: 1e-4 for a LoRA, 1e-5 with --full)."),
    seed: int = typer.Option(0, help="Seed of every random draw (and of the class images)."),
    sample_prompt: list[str] = typer.Option(None, "--sample-prompt", help="A prompt for the sample grids; repeat."),
    sample_every: int = typer.Option(0, help="Write a sample grid every N steps (0: at the end)."),
    models_dir: Path | None = typer.Option(None, help="A1111-style models folder (default: ./models)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT-training/."),
    device: str = _ADAPTER["device"],
) -> None:
    """DreamBooth (Ruiz et al. 2023) as a LoRA: teach the model a subject from a few images under a rare word,
    with the prior-preservation loss on the base model's own images of the class."""
    from tqdm import tqdm

    from imagine.data.images import DataError, load_folder
    from imagine.io import models_dir as md
    from imagine.io.checkpoint import CheckpointError
    from imagine.pipelines.request import load_text_model
    from imagine.train.lora import LoraTrainConfig, class_images, lora_sample_hook, train_full, train_lora

    progress = training_progress()
    try:
        if prior_weight > 0 and not class_prompt:
            raise ValueError("prior preservation needs --class-prompt (or --prior-weight 0 to train without it)")
        if full and (text_encoder or targets != "attn" or algo != "lora"):
            raise ValueError("--full fine-tunes the whole UNet: --text-encoder, --targets and --algo are LoRA "
                             "options")
        if not full and out.suffix != ".safetensors":
            raise ValueError(f"{out}: a LoRA is written as .safetensors (or pass --full to write a model)")
        cfg = LoraTrainConfig(rank=lora, targets=targets, text_encoder=text_encoder, steps=steps, batch_size=batch_size,
                              lr=lr if lr is not None else (1e-5 if full else 1e-4), seed=seed,
                              prior_weight=prior_weight, algo=algo)
        folder = models_dir if models_dir is not None else md.default_models_dir()
        loaded, encoder = load_text_model(md.resolve(model, folder))
        instances = load_folder(instance_data, loaded.spec.image_size, loaded.spec.image_channels, captions=True,
                                default_caption=instance_prompt)
        prior = None
        if prior_weight > 0:
            bar = tqdm(total=num_class_images, desc="class images", unit="image", leave=False)
            from imagine.train.lora import checkpoint_dir

            root = checkpoint_dir(out)
            prior = class_images(loaded, encoder, class_prompt, num_class_images, root / "class_images", seed=seed,
                                 callback=lambda done, total: bar.update(done - bar.n))
            bar.close()
        prompts = list(sample_prompt or [instance_prompt, *list(class_prompt or [])[:1]])
        hooks = (progress, lora_sample_hook(prompts, sample_every or steps))
        train = train_full if full else train_lora
        path = train(loaded, encoder, instances, cfg, out, resume=resume, hooks=hooks, prior=prior,
                     device=device)
    except (ValueError, CheckpointError, FileNotFoundError, DataError) as err:
        progress(None, None)
        fail(str(err))
    progress(None, None)
    _adapter_written(out, path, "class images, log, loss plot and samples")


@app.command("textual-inversion", rich_help_panel=TRAIN)
def textual_inversion(
    model: str = typer.Option(..., help="The base model: a folder, an SD .safetensors or a name in the models folder."),
    data: str = typer.Option(..., help="A few images of the concept (a folder; captions only for {caption})."),
    token: str = typer.Option(..., help='The new word, written in prompts to call the concept: "<my-concept>".'),
    out: Path = typer.Option(..., help="The embedding to write (.safetensors, A1111's layout); checkpoints, log "
                                       "and samples go to OUT-training/ beside it."),
    init_word: str = typer.Option("*", help="The vectors start as this word's embeddings (a close class word: "
                                            "shape, cat)."),
    vectors: int = typer.Option(1, help="How many word vectors the token stands for (A1111's vectors per token)."),
    template: str = typer.Option("a {token}", help="The training prompt: {token}, and {caption} for each image's "
                                                  "own caption."),
    steps: int = _ADAPTER["steps"],
    batch_size: int = _ADAPTER["batch_size"],
    lr: float = typer.Option(5e-3, help="AdamW learning rate of the vectors."),
    seed: int = _ADAPTER["seed"],
    flip: bool = _ADAPTER["flip"],
    precision: str = _ADAPTER["precision"],
    device: str = _ADAPTER["device"],
    checkpoint_every: int = _ADAPTER["checkpoint_every"],
    sample_prompt: list[str] = typer.Option(None, "--sample-prompt", help="A prompt for the sample grids; repeat "
                                                                          "(default: the template)."),
    sample_every: int = typer.Option(0, help="Write a sample grid every N steps (0: at the end)."),
    models_dir: Path | None = typer.Option(None, help="A1111-style models folder (default: ./models)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT-training/."),
) -> None:
    """Textual inversion (Gal et al. 2022): learn a new word's vectors from a few images, everything else
    frozen; write the word in a prompt to use it (put the file in models/embeddings/ to find it by name)."""
    from imagine.data.images import DataError, load_dataset
    from imagine.io import models_dir as md
    from imagine.io.checkpoint import CheckpointError
    from imagine.pipelines.request import load_text_model
    from imagine.train.lora import lora_sample_hook
    from imagine.train.textual_inversion import TextualInversionConfig, train_textual_inversion

    progress = training_progress()
    try:
        cfg = TextualInversionConfig(token=token, vectors=vectors, init_word=init_word, template=template,
                                     steps=steps, batch_size=batch_size, lr=lr, seed=seed, flip=flip,
                                     precision=precision, checkpoint_every=checkpoint_every)
        folder = models_dir if models_dir is not None else md.default_models_dir()
        loaded, encoder = load_text_model(md.resolve(model, folder))
        dataset = load_dataset(data, loaded.spec.image_size, loaded.spec.image_channels,
                               captions="{caption}" in template)
        prompts = list(sample_prompt or [template.format(token=token, caption="")])
        hooks = (progress, lora_sample_hook(prompts, sample_every or steps))
        path = train_textual_inversion(loaded, encoder, dataset, cfg, out, resume=resume, hooks=hooks,
                                       device=device)
    except (ValueError, CheckpointError, FileNotFoundError, DataError) as err:
        progress(None, None)
        fail(str(err))
    progress(None, None)
    _adapter_written(out, path, "log, loss plot and samples")


def _train_control(kind: str, model, condition, data, out, steps, batch_size, lr, caption_dropout, seed,
                   precision, checkpoint_every, sample_every, models_dir, resume, num_res_blocks=2,
                   device: str = "auto") -> None:
    from imagine.data.images import DataError, load_dataset
    from imagine.io import models_dir as md
    from imagine.io.checkpoint import CheckpointError
    from imagine.pipelines.request import load_text_model
    from imagine.train.control import ControlTrainConfig, control_sample_hook, held_out_items, train_control

    progress = training_progress()
    try:
        cfg = ControlTrainConfig(condition=condition, kind=kind, steps=steps, batch_size=batch_size, lr=lr,
                                 caption_dropout=caption_dropout, seed=seed, precision=precision,
                                 checkpoint_every=checkpoint_every, num_res_blocks=num_res_blocks)
        folder = models_dir if models_dir is not None else md.default_models_dir()
        loaded, encoder = load_text_model(md.resolve(model, folder) if model else _default_model())
        size = loaded.spec.image_size
        dataset = load_dataset(data, size, loaded.spec.image_channels, captions=True)
        hooks = (progress, control_sample_hook(held_out_items(data, size), sample_every or steps))
        path = train_control(loaded, encoder, dataset, cfg, out, resume=resume, hooks=hooks, device=device)
    except (ValueError, CheckpointError, FileNotFoundError, DataError) as err:
        progress(None, None)
        fail(str(err))
    progress(None, None)
    _adapter_written(out, path, "log, loss plot and sample grids (condition | outputs)")
    typer.echo(f"use it: imagine generate PROMPT --control {condition}@{path}:IMAGE (or put it in "
               "models/ControlNet/ to find it by its condition)")


def _default_model() -> Path:
    from imagine.weights import default_model

    return default_model()


_CONTROL = dict(
    model=typer.Option(None, help="The base model: a folder, an SD .safetensors or a name in the models folder "
                                  "(default: the shipped one)."),
    condition=typer.Option(..., help="The condition it learns to read, computed from each training image by the "
                                     "preprocessor of that name: canny, scribble, segmentation, keypoints, tile."),
    data=typer.Option("builtin:shapes", help="Captioned images: builtin:shapes, or a folder with .txt captions."),
    steps=typer.Option(2000, help="Optimizer steps (a resumed run trains on to this count)."),
    caption_dropout=typer.Option(0.5, help="Train on the empty prompt this often (the paper: 0.5), so the "
                                           "condition alone is read."),
    sample_every=typer.Option(0, help="Write a condition | outputs grid every N steps (0: at the end)."),
    models_dir=typer.Option(None, help="A1111-style models folder (default: ./models)."),
    resume=typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT-training/."),
)


@app.command("train-controlnet", rich_help_panel=TRAIN)
def train_controlnet(
    out: Path = typer.Option(..., help="The ControlNet folder to write (diffusers' layout; put it in "
                                       "models/ControlNet/). Checkpoints, log, samples: OUT-training/."),
    model: str | None = _CONTROL["model"], condition: str = _CONTROL["condition"], data: str = _CONTROL["data"],
    steps: int = _CONTROL["steps"], batch_size: int = _ADAPTER["batch_size"],
    lr: float = typer.Option(1e-4, help="AdamW learning rate."),
    caption_dropout: float = _CONTROL["caption_dropout"], seed: int = _ADAPTER["seed"],
    precision: str = _ADAPTER["precision"], checkpoint_every: int = _ADAPTER["checkpoint_every"],
    device: str = _ADAPTER["device"],
    sample_every: int = _CONTROL["sample_every"], models_dir: Path | None = _CONTROL["models_dir"],
    resume: bool = _CONTROL["resume"],
) -> None:
    """Train a ControlNet (Zhang et al. 2023): a copy of the model's encoder that reads a condition map,
    joined to the frozen UNet through zero convolutions (so it starts as the base model)."""
    _train_control("controlnet", model, condition, data, out, steps, batch_size, lr, caption_dropout, seed, precision,
                   checkpoint_every, sample_every, models_dir, resume, device=device)


@app.command("train-adapter", rich_help_panel=TRAIN)
def train_adapter(
    out: Path = typer.Option(..., help="The T2I-Adapter folder to write (diffusers' layout; put it in "
                                       "models/ControlNet/). Checkpoints, log, samples: OUT-training/."),
    model: str | None = _CONTROL["model"], condition: str = _CONTROL["condition"], data: str = _CONTROL["data"],
    steps: int = _CONTROL["steps"], batch_size: int = _ADAPTER["batch_size"],
    lr: float = typer.Option(1e-4, help="AdamW learning rate."),
    num_res_blocks: int = typer.Option(2, help="Residual blocks per level."),
    caption_dropout: float = _CONTROL["caption_dropout"], seed: int = _ADAPTER["seed"],
    precision: str = _ADAPTER["precision"], checkpoint_every: int = _ADAPTER["checkpoint_every"],
    device: str = _ADAPTER["device"],
    sample_every: int = _CONTROL["sample_every"], models_dir: Path | None = _CONTROL["models_dir"],
    resume: bool = _CONTROL["resume"],
) -> None:
    """Train a T2I-Adapter (Mou et al. 2023): a small network whose features join the frozen UNet's encoder."""
    _train_control("t2i_adapter", model, condition, data, out, steps, batch_size, lr, caption_dropout, seed,
                   precision, checkpoint_every, sample_every, models_dir, resume, num_res_blocks, device=device)


@app.command("train-ip-adapter", rich_help_panel=TRAIN)
def train_ip_adapter_cmd(
    out: Path = typer.Option(..., help="The IP-Adapter file to write (.safetensors, the original layout; put it "
                                       "in models/ipadapter/). Checkpoints, log, samples: OUT-training/."),
    model: str | None = _CONTROL["model"], data: str = _CONTROL["data"],
    image_encoder: str = typer.Option("shapes-clip", help="What reads the reference: shapes-clip (the shipped "
                                      "scorer's image tower), a ShapesCLIP or CLIP vision folder, or a global "
                                      "condition: palette (CIELab histogram) or intensity (luminance)."),
    steps: int = _CONTROL["steps"], batch_size: int = _ADAPTER["batch_size"],
    lr: float = typer.Option(2e-4, help="AdamW learning rate."),
    caption_dropout: float = typer.Option(0.5, help="Train on the empty prompt this often, so the image alone "
                                                    "is read (variations)."),
    image_dropout: float = typer.Option(0.1, help="Drop the image (zero embedding) this often, so guidance "
                                                  "works on it."),
    rerender: float = typer.Option(0.75, help="builtin:shapes: the reference is the scene re-rendered (same "
                                              "objects, new places) this often, else the image itself."),
    seed: int = _ADAPTER["seed"], precision: str = _ADAPTER["precision"],
    device: str = _ADAPTER["device"],
    checkpoint_every: int = _ADAPTER["checkpoint_every"], sample_every: int = _CONTROL["sample_every"],
    models_dir: Path | None = _CONTROL["models_dir"], resume: bool = _CONTROL["resume"],
) -> None:
    """Train an IP-Adapter (Ye et al. 2023): prompting with an image through decoupled cross-attention on the
    frozen model; with --image-encoder palette or intensity, Composer's global conditions."""
    from imagine.data.images import DataError, load_dataset
    from imagine.io import models_dir as md
    from imagine.io.checkpoint import CheckpointError
    from imagine.pipelines.request import load_text_model
    from imagine.train.control import held_out_items
    from imagine.train.ip_adapter import IPAdapterTrainConfig, ip_sample_hook, train_ip_adapter

    progress = training_progress()
    try:
        cfg = IPAdapterTrainConfig(image_encoder=image_encoder, steps=steps, batch_size=batch_size, lr=lr,
                                   caption_dropout=caption_dropout, image_dropout=image_dropout, rerender=rerender,
                                   seed=seed, precision=precision, checkpoint_every=checkpoint_every)
        folder = models_dir if models_dir is not None else md.default_models_dir()
        loaded, encoder = load_text_model(md.resolve(model, folder) if model else _default_model())
        size = loaded.spec.image_size
        dataset = load_dataset(data, size, loaded.spec.image_channels, captions=True)
        hooks = (progress, ip_sample_hook(held_out_items(data, size), sample_every or steps))
        path = train_ip_adapter(loaded, encoder, dataset, cfg, out, resume=resume, hooks=hooks, device=device)
    except (ValueError, CheckpointError, FileNotFoundError, DataError) as err:
        progress(None, None)
        fail(str(err))
    progress(None, None)
    _adapter_written(out, path, "log, loss plot and sample grids (reference | outputs)")
    kind = image_encoder if image_encoder in ("palette", "intensity") else "content"
    typer.echo(f"use it: imagine generate PROMPT --image-prompt {kind}@{path}:IMAGE (or put it in models/ipadapter/ "
               "to find it by its kind)")


@app.command("distill-lcm", rich_help_panel=TRAIN)
def distill_lcm_cmd(
    out: Path = typer.Option(..., help="The LCM to write: a model folder, or with --lora an LCM-LoRA .safetensors "
                                       "(kohya's layout). Checkpoints, log, samples: OUT-training/."),
    model: str | None = _CONTROL["model"], data: str = _CONTROL["data"],
    steps: int = typer.Option(4000, help="Optimizer steps (a resumed run trains on to this count)."),
    lora: int = typer.Option(0, help="Distil LCM-LoRA of this rank instead of a full model: it then speeds up "
                                     "fine-tunes of the same base (use it with --sampler lcm --steps 4 --cfg 1)."),
    batch_size: int = typer.Option(8, help="Latents per step."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate."),
    cfg_min: float = typer.Option(1.5, help="The smallest guidance scale the LCM learns (embedded as w = cfg - 1)."),
    cfg_max: float = typer.Option(6.0, help="The largest guidance scale it learns."),
    original_steps: int = typer.Option(50, help="The teacher's skipping grid: one solver step spans "
                                                "T / N timesteps (the paper: 50)."),
    ema_decay: float = typer.Option(0.95, help="Decay of the target network's EMA."),
    seed: int = _ADAPTER["seed"], precision: str = _ADAPTER["precision"],
    device: str = _ADAPTER["device"],
    checkpoint_every: int = typer.Option(250, help="Save the training state every N steps."),
    sample_every: int = _CONTROL["sample_every"],
    models_dir: Path | None = _CONTROL["models_dir"], resume: bool = _CONTROL["resume"],
) -> None:
    """Latent consistency distillation (Luo et al. 2023): a model (or LoRA) that samples in 1 to 4 steps."""
    from imagine.data.images import DataError, load_dataset
    from imagine.io import models_dir as md
    from imagine.io.checkpoint import CheckpointError
    from imagine.pipelines.request import load_text_model
    from imagine.train.control import held_out_items
    from imagine.train.lcm import LCMDistillConfig, distill_lcm, lcm_sample_hook

    progress = training_progress()
    try:
        cfg = LCMDistillConfig(steps=steps, batch_size=batch_size, lr=lr, cfg_min=cfg_min, cfg_max=cfg_max,
                               original_steps=original_steps, ema_decay=ema_decay, lora_rank=lora, seed=seed,
                               precision=precision, checkpoint_every=checkpoint_every)
        folder = models_dir if models_dir is not None else md.default_models_dir()
        loaded, encoder = load_text_model(md.resolve(model, folder) if model else _default_model())
        dataset = load_dataset(data, loaded.spec.image_size, loaded.spec.image_channels, captions=True)
        prompts = [caption for _, caption in held_out_items(data, loaded.spec.image_size, count=2)]
        hooks = (progress, lcm_sample_hook(prompts, sample_every or steps))
        path = distill_lcm(loaded, encoder, dataset, cfg, out, resume=resume, hooks=hooks, device=device)
    except (ValueError, CheckpointError, FileNotFoundError, DataError) as err:
        progress(None, None)
        fail(str(err))
    progress(None, None)
    _adapter_written(out, path, "log, loss plot and sample grids (1, 2 and 4 steps per prompt)")
    if lora:
        typer.echo(f"use it: imagine generate PROMPT --lora {path} --sampler lcm --steps 4 --cfg 1")
    else:
        typer.echo(f"use it: imagine generate PROMPT --model {path} (the lcm sampler at 4 steps is its default)")

