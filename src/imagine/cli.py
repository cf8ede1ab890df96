"""The `imagine` command: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from imagine import __version__

app = typer.Typer(
    name="imagine",
    help="Diffusion-model image generation: train, sample, evaluate and serve, CPU first.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def samplers(
    as_json: bool = typer.Option(False, "--json", help="Print JSON with each sampler's A1111 aliases."),
) -> None:
    """List the sampler names, one per line (or as JSON with their A1111 aliases)."""
    from imagine.samplers import SAMPLERS, a1111_aliases

    if as_json:
        rows = [
            {"name": name, "a1111_aliases": a1111_aliases(name), "stochastic": info.stochastic,
             "description": info.description}
            for name, info in SAMPLERS.items()
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    for name in SAMPLERS:
        typer.echo(name)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def train(
    data: str = typer.Option(..., help="A folder of images, or builtin:digits."),
    out: Path = typer.Option(..., help="Where the model folder (and checkpoints, samples, logs) goes."),
    preset: str = typer.Option("small", help="Settings to start from: tiny (seconds), small, digits."),
    steps: int | None = typer.Option(None, help="Total steps; a resumed run trains on to this count."),
    batch_size: int | None = typer.Option(None, help="Global batch size, over all processes."),
    lr: float | None = typer.Option(None, help="Peak learning rate (AdamW)."),
    image_size: int | None = typer.Option(None, help="Images are resized and center-cropped to this."),
    classes: bool | None = typer.Option(None, "--classes/--no-classes",
                                        help="Class-conditional, classes from sub-folder names (on for digits)."),
    channels: int = typer.Option(3, help="Image channels for folder data: 3 (RGB) or 1 (grey)."),
    flip: bool | None = typer.Option(None, "--flip/--no-flip", help="Random horizontal flips."),
    precision: str | None = typer.Option(None, help="fp32, or bf16 autocast with fp32 master weights."),
    prediction: str | None = typer.Option(None, help="eps, v or x0."),
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
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
) -> None:
    """Train a diffusion model on a folder of images or a built-in dataset (in pixels, or in a VAE's latents)."""
    from imagine.data.images import DataError, load_dataset
    from imagine.train.config import preset as get_preset
    from imagine.train.loop import _distributed, loss_curve, read_log
    from imagine.train.loop import train as run_training

    try:
        cfg = get_preset(preset)
        is_digits = data == "builtin:digits"
        cfg = cfg.with_overrides(
            steps=steps, batch_size=batch_size, lr=lr, image_size=image_size, precision=precision,
            prediction=prediction, schedule=schedule, grad_accum=grad_accum, checkpoint_every=checkpoint_every,
            min_snr_gamma=min_snr_gamma, offset_noise=offset_noise, learned_variance=learned_variance,
            sample_every=sample_every, seed=seed, flip=flip,
            class_conditional=classes if classes is not None else (is_digits or None))
        dataset = load_dataset(data, cfg.image_size, channels, class_from_subfolders=cfg.class_conditional
                               and not is_digits)
        latents = None
        if vae is not None:
            from imagine.models import load_vae
            from imagine.train.vae import encode_dataset

            autoencoder = load_vae(vae)
            if cfg.image_size % autoencoder.config.downscale:
                raise ValueError(f"image size {cfg.image_size} is not a multiple of the VAE's factor "
                                 f"{autoencoder.config.downscale}")
            if autoencoder.config.in_channels != dataset.images.shape[1]:
                raise ValueError(f"the VAE takes {autoencoder.config.in_channels}-channel images, the data has "
                                 f"{dataset.images.shape[1]}: pass --channels {autoencoder.config.in_channels}")
            latents = encode_dataset(autoencoder, dataset)
    except (ValueError, DataError) as err:
        _fail(str(err))
    rank, _ = _distributed()
    hooks = [] if rank else [_progress_hook(), _sample_grid_hook()]
    try:
        run_training(cfg, dataset, out, resume=resume, latents=latents, vae_dir=vae, hooks=tuple(hooks))
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        _fail(str(err))
    if rank == 0:
        hooks[0](None, {})  # close the bar
        loss_curve(read_log(out / "log.jsonl"), out / "loss.png")
        typer.echo(f"model written to {out} (loss curve: {out / 'loss.png'})")


@app.command("train-vae")
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
) -> None:
    """Train the KL autoencoder that latent diffusion runs in (reconstruction + KL)."""
    from imagine.data.images import DataError, load_dataset
    from imagine.train.loop import loss_curve, read_log
    from imagine.train.vae import train_vae, vae_preset

    try:
        cfg = vae_preset(preset).with_overrides(steps=steps, batch_size=batch_size, lr=lr, image_size=image_size)
        dataset = load_dataset(data, cfg.image_size, channels)
        hook = _progress_hook()
        train_vae(cfg, dataset, out, resume=resume, hooks=(hook,))
        hook(None, {})
    except (ValueError, DataError, FileNotFoundError) as err:
        _fail(str(err))
    loss_curve(read_log(out / "log.jsonl"), out / "loss.png")
    typer.echo(f"VAE written to {out}")


def _progress_hook():
    from tqdm import tqdm

    state: dict = {}

    def hook(info, context):
        if info is None:
            if "bar" in state:
                state["bar"].close()
            return
        if "bar" not in state:
            state["bar"] = tqdm(total=info.total, initial=info.step - 1, desc="train", unit="step", dynamic_ncols=True)
        state["bar"].update(1)
        state["bar"].set_postfix(loss=f"{info.loss:.4f}", img_s=f"{info.images_per_s:.0f}")

    return hook


def _sample_grid_hook():
    """Every sample_every steps: a grid from the EMA weights (rows: classes), under out/samples/."""
    import torch
    from PIL import Image

    state: dict = {}

    from imagine.io.model_folder import DiffusionModel
    from imagine.pipelines.unconditional import generate, grid, to_uint8

    def hook(info, context):
        cfg = context["config"]
        if info is None or not cfg.sample_every or (info.step % cfg.sample_every and info.step != info.total):
            return
        spec = context["spec"]
        vae = None
        if spec.latent:
            from imagine.models import load_vae

            vae = state.setdefault("vae", load_vae(context["vae_dir"]))
        model = DiffusionModel(context["ema"].model, vae, spec, context["out"])
        classes = list(range(len(spec.class_names))) or [None]
        cols = 8 if len(classes) > 1 else 32
        rows = []
        for c in classes:
            cfg_scale = 3.0 if c is not None and cfg.label_dropout > 0 else 1.0
            rows.append(generate(model, list(range(cols)), steps=20, sampler="dpmpp_2m", class_label=c, cfg=cfg_scale))
        images = to_uint8(torch.cat(rows))
        path = context["out"] / "samples" / f"step_{info.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid(images, rows=len(classes) if len(classes) > 1 else 4).squeeze()).save(path)

    return hook


@app.command()
def sample(
    model: Path = typer.Option(..., help="A model folder written by `imagine train`."),
    n: int = typer.Option(1, help="How many images; image i uses seed + i."),
    seed: int = typer.Option(0, help="Seed of the first image."),
    steps: int | None = typer.Option(None, help="Sampling steps (default: the model's)."),
    sampler: str | None = typer.Option(None, help="Sampler, ours or A1111's name (see `imagine samplers`)."),
    class_label: str | None = typer.Option(None, "--class", help="Class name or index, for class-conditional models."),
    cfg: float = typer.Option(1.0, help="Classifier-free guidance scale (1: off)."),
    out: Path = typer.Option(Path("samples"), help="Folder for the PNGs."),
    batch_size: int = typer.Option(16, help="Images generated together (does not change any image)."),
) -> None:
    """Generate images from a trained model: N PNGs, image i from seed S + i."""
    from PIL import Image

    from imagine.io.checkpoint import CheckpointError
    from imagine.io.model_folder import load_model_folder
    from imagine.pipelines.unconditional import class_index, generate, to_uint8

    try:
        loaded = load_model_folder(model)
        label = class_index(loaded, class_label)
        steps = steps or loaded.spec.default_steps
        sampler = sampler or loaded.spec.default_sampler
        if n < 1:
            raise ValueError(f"--n must be >= 1, got {n}")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for start in range(0, n, batch_size):
            seeds = list(range(seed + start, seed + min(n, start + batch_size)))
            images = to_uint8(generate(loaded, seeds, steps=steps, sampler=sampler, class_label=label, cfg=cfg))
            for s, img in zip(seeds, images, strict=True):
                path = _free_name(out, f"{s:06d}" + (f"_class{label}" if label is not None else ""))
                Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(path)
                written.append(path)
    except (ValueError, CheckpointError) as err:
        _fail(str(err))
    typer.echo("\n".join(str(p) for p in written))


def _free_name(folder: Path, stem: str) -> Path:
    """folder/stem.png, or stem-1.png, stem-2.png... : never overwrite an existing file."""
    path, k = folder / f"{stem}.png", 1
    while path.exists():
        path, k = folder / f"{stem}-{k}.png", k + 1
    return path


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
