"""The `imagine` command: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import json
from enum import Enum
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
    data: str | None = typer.Option(None, help="A folder of images, builtin:digits or builtin:shapes (default: the "
                                               "preset's, e.g. shapes-default trains on builtin:shapes)."),
    out: Path = typer.Option(..., help="Where the model folder (and checkpoints, samples, logs) goes."),
    preset: str = typer.Option("small", help="Settings to start from: tiny (seconds), small, digits, t2i, "
                                             "shapes-default (the shipped model), tiny-t2i."),
    steps: int | None = typer.Option(None, help="Total steps; a resumed run trains on to this count."),
    batch_size: int | None = typer.Option(None, help="Global batch size, over all processes."),
    lr: float | None = typer.Option(None, help="Peak learning rate (AdamW)."),
    image_size: int | None = typer.Option(None, help="Images are resized and center-cropped to this."),
    classes: bool | None = typer.Option(None, "--classes/--no-classes",
                                        help="Class-conditional, classes from sub-folder names (on for digits)."),
    channels: int = typer.Option(3, help="Image channels for folder data: 3 (RGB) or 1 (grey)."),
    caption_dropout: float | None = typer.Option(None, help="Text models: train on the empty prompt this often."),
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
        data = data or cfg.data
        if data is None:
            raise ValueError(f"preset {preset!r} has no dataset of its own: pass --data FOLDER (or builtin:digits)")
        is_digits = data == "builtin:digits"
        cfg = cfg.with_overrides(
            steps=steps, batch_size=batch_size, lr=lr, image_size=image_size, precision=precision,
            prediction=prediction, schedule=schedule, grad_accum=grad_accum, checkpoint_every=checkpoint_every,
            min_snr_gamma=min_snr_gamma, offset_noise=offset_noise, learned_variance=learned_variance,
            sample_every=sample_every, seed=seed, flip=flip,
            class_conditional=classes if classes is not None else (is_digits or None),
            caption_dropout=caption_dropout)
        dataset = load_dataset(data, cfg.image_size, channels, class_from_subfolders=cfg.class_conditional
                               and not is_digits, captions=cfg.text_conditional)
        text_encoder = None
        if cfg.text_conditional:
            from imagine.models.text_encoders import load_text_encoder

            text_encoder = load_text_encoder(cfg.text_encoder)
        if vae is None and cfg.vae_preset is not None:
            vae = _train_first_vae(cfg, data, dataset, out)
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
    except (ValueError, DataError) as err:
        _fail(str(err))
    rank, _ = _distributed()
    hooks = [] if rank else [_progress_hook(), _sample_grid_hook()]
    try:
        run_training(cfg, dataset, out, resume=resume, latents=latents, vae_dir=vae, text_encoder=text_encoder,
                     vae=autoencoder if (vae is not None and latents is None) else None, hooks=tuple(hooks))
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        _fail(str(err))
    if rank == 0:
        hooks[0](None, {})  # close the bar
        loss_curve(read_log(out / "log.jsonl"), out / "loss.png")
        typer.echo(f"model written to {out} (loss curve: {out / 'loss.png'})")


def _train_first_vae(cfg, data: str, dataset, out: Path) -> Path:
    """A latent preset with no --vae: train one into OUT/vae_training, resuming a run that was cut short
    or that the preset now trains further (e.g. a decoder stage added after it finished)."""
    from imagine.train.checkpoint import checkpoint_step, latest_checkpoint
    from imagine.train.vae import train_vae, vae_preset

    folder = out / "vae_training"
    vcfg = vae_preset(cfg.vae_preset).with_overrides(image_size=cfg.image_size, seed=cfg.seed)
    total = vcfg.steps + vcfg.decoder_steps
    last = latest_checkpoint(folder / "checkpoints")
    done = checkpoint_step(last) if last is not None else 0
    if (folder / "model.safetensors").exists() and (last is None or done >= total):
        typer.echo(f"using the VAE trained earlier in {folder}")
        return folder
    typer.echo(f"no --vae given: training one first ({cfg.vae_preset}, {total} steps"
               f"{f', from step {done}' if done else ''}) in {folder}")
    hook = _progress_hook()
    train_vae(vcfg, dataset, folder, resume=last is not None, hooks=(hook,))
    hook(None, {})
    return folder


@app.command("train-clip")
def train_clip_command(
    out: Path = typer.Option(..., help="Where the CLIP model folder goes (config.json, model.safetensors, eval.json)."),
    preset: str = typer.Option("shapes-clip", help="shapes-clip (the shipped scorer) or tiny (seconds)."),
    steps: int | None = typer.Option(None, help="Training steps."),
    seed: int | None = typer.Option(None, help="Seed of the scenes and the run."),
) -> None:
    """Train the CLIP-style scorer on builtin:shapes and report its zero-shot retrieval on held-out scenes."""
    from dataclasses import replace

    from tqdm import tqdm

    from imagine.models.text_encoders import default_text_encoder
    from imagine.train.clip import CLIP_PRESETS, train_clip

    if preset not in CLIP_PRESETS:
        _fail(f"preset {preset!r} unknown; choose one of: {', '.join(CLIP_PRESETS)}")
    cfg = CLIP_PRESETS[preset]
    cfg = replace(cfg, **{k: v for k, v in {"steps": steps, "seed": seed}.items() if v is not None})
    bar = tqdm(total=cfg.steps, desc="train-clip", unit="step")

    def progress(step, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    metrics = train_clip(cfg, out, default_text_encoder(), progress)
    bar.close()
    typer.echo(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))
    typer.echo(f"CLIP model written to {out}")


@app.command()
def export(
    model: Path = typer.Argument(..., help="A model folder written by `imagine train`."),
    out: Path = typer.Argument(..., help="Where the exported folder goes (must not exist)."),
    dtype: str = typer.Option("fp16", help="Weights precision: fp16, bf16 or fp32."),
) -> None:
    """Copy a model folder for distribution: UNet (its EMA weights), VAE and spec only, in fp16 by default.
    Training state, checkpoints, samples and logs are left behind."""
    from imagine.io.checkpoint import CheckpointError
    from imagine.io.model_folder import SPEC_NAME, load_model_folder
    from imagine.models import save_unet, save_vae

    if out.exists():
        _fail(f"{out} exists; export writes a fresh folder")
    try:
        loaded = load_model_folder(model)
        tmp = out.with_name(f".{out.name}.partial")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        save_unet(loaded.unet, tmp / "unet", None if dtype == "fp32" else dtype)
        if loaded.vae is not None:
            save_vae(loaded.vae, tmp / "vae", None if dtype == "fp32" else dtype)
        (tmp / SPEC_NAME).write_bytes((Path(model) / SPEC_NAME).read_bytes())
        tmp.rename(out)  # the folder appears whole or not at all
    except (ValueError, CheckpointError) as err:
        _fail(str(err))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    typer.echo(f"exported {model} -> {out} ({dtype}, {size / 1e6:.1f} MB)")


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
        if spec.text_encoder is not None:
            from imagine.pipelines.generate import Settings, txt2img

            prompts = context["sample_prompts"]
            encoder = context["text_encoder"]
            images = torch.cat([txt2img(model, Settings(prompt=p, steps=20, cfg_scale=5.0, n=4), encoder)
                                for p in prompts])
            path = context["out"] / "samples" / f"step_{info.step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid(to_uint8(images), rows=len(prompts)).squeeze()).save(path)
            (path.with_suffix(".txt")).write_text("\n".join(prompts) + "\n")
            return
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

    from imagine.io.checkpoint import CheckpointError
    from imagine.io.model_folder import load_model_folder
    from imagine.io.png import free_path, save_png
    from imagine.pipelines.generate import Settings, describe
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
                path = free_path(out, f"{s:06d}" + (f"_class{label}" if label is not None else ""))
                prompt = f"class {loaded.spec.class_names[label]}" if label is not None else ""
                settings = Settings(prompt=prompt, steps=steps, sampler=sampler, cfg_scale=cfg, seed=s)
                parameters, record = describe(loaded, settings, "sample", 0, None, {"class": label})
                save_png(path, img, parameters, record)
                written.append(path)
    except (ValueError, CheckpointError) as err:
        _fail(str(err))
    typer.echo("\n".join(str(p) for p in written))


def _load_t2i(model: Path | None):
    from imagine.io.model_folder import load_model_folder
    from imagine.models.text_encoders import load_text_encoder

    loaded = load_model_folder(model if model is not None else _default_model())
    if loaded.spec.text_encoder is None:
        _fail(f"{model} is not a text-to-image model; use `imagine sample` for class-conditional models")
    return loaded, load_text_encoder(loaded.spec.text_encoder)


def _open_image(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        _fail(f"cannot read the {what} {path}: {err}")


def _run_generation(kind: str, model: Path | None, settings, out: Path, init: Path | None = None,
                    mask: Path | None = None, record_extra: dict | None = None, rerank: int = 1,
                    clip: Path | None = None) -> None:
    """Shared by generate, img2img and inpaint: validate everything, generate, then write the PNGs."""
    from dataclasses import replace

    import torch
    from tqdm import tqdm

    from imagine.io.checkpoint import CheckpointError
    from imagine.io.png import free_path, save_png
    from imagine.pipelines import generate as g
    from imagine.pipelines.unconditional import to_uint8

    try:
        loaded, encoder = _load_t2i(model)
        settings = settings.with_model_defaults(loaded.spec, settings.steps, settings.sampler,
                                                settings.cfg_scale).validate()
        if kind == "txt2img":  # refuse a bad size before any work (img2img/inpaint take the image's)
            g.output_size(loaded, settings)
        init_img = _open_image(init, "image") if init is not None else None
        mask_img = _open_image(mask, "mask") if mask is not None else None
        scorer, scorer_path = _load_scorer(clip) if rerank > 1 else (None, None)
        runs = settings.n * rerank if rerank > 1 else 1
        bar = tqdm(total=settings.steps * runs, desc=kind, unit="step", leave=False)

        def progress(info):
            bar.update(1)

        reranked = None
        if kind == "txt2img" and scorer is not None:
            from imagine.pipelines.rerank import txt2img_reranked

            reranked = txt2img_reranked(loaded, settings, encoder, scorer, rerank, callback=progress)
            images = torch.stack([r.image for r in reranked])
        elif kind == "txt2img":
            images = g.txt2img(loaded, settings, encoder, callback=progress)
        elif kind == "img2img":
            images = g.img2img(loaded, settings, init_img, encoder, callback=progress)
        else:
            images = g.inpaint(loaded, settings, init_img, mask_img, encoder, callback=progress)
        bar.close()
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        _fail(str(err))
    extra = dict(record_extra or {})
    if init is not None:
        from imagine.io.png import file_hash

        extra["init_image"] = {"path": str(Path(init).resolve()), "sha256_10": file_hash(init)}
    if mask is not None:
        extra["mask"] = {"path": str(Path(mask).resolve()), "sha256_10": file_hash(mask)}
    for i, pixels in enumerate(to_uint8(images)):
        if reranked is not None:  # the kept candidate stands alone: its own seed, n = 1
            r = reranked[i]
            parameters, record = g.describe(loaded, replace(settings, seed=r.seed, n=1), kind, 0, encoder,
                                            {**extra, "rerank": {"k": rerank, "chosen": r.chosen, "scores": r.scores,
                                                                 "scorer": str(scorer_path)}})
            stem = f"{r.seed:06d}-{kind}"
        else:
            parameters, record = g.describe(loaded, settings, kind, i, encoder, extra)
            stem = f"{settings.seed + i:06d}-{kind}"
        path = save_png(free_path(out, stem), pixels, parameters, record)
        typer.echo(str(path))


def _load_scorer(clip: Path | None):
    """(scorer, its folder) for --rerank: a folder from `imagine train-clip`, or the one shipped with imagine."""
    from imagine.models import load_clip
    from imagine.models.clip import CLIPScorer
    from imagine.models.text_encoders import load_text_encoder
    from imagine.weights import default_clip

    path = clip if clip is not None else default_clip()
    model = load_clip(path)
    return CLIPScorer(model, load_text_encoder(model.config.text_encoder)), Path(path)


def _settings(prompt, negative, steps, sampler, schedule, cfg, rescale, seed, n, width, height, **more):
    from imagine.pipelines.generate import Settings

    return Settings(prompt=prompt, negative_prompt=negative, steps=steps, sampler=sampler, schedule=schedule,
                    cfg_scale=cfg, guidance_rescale=rescale, seed=seed, n=n, width=width, height=height, **more)


_PROMPT_OPTS = dict(
    negative=typer.Option("", "--negative", help="Negative prompt."),
    steps=typer.Option(None, help="Sampling steps (default: the model's; 25 for the shipped one)."),
    sampler=typer.Option(None, help="Sampler: ours or A1111's name ('DPM++ 2M Karras'; default: the model's)."),
    schedule=typer.Option(None, help="Sigma schedule: default or karras (default: what the sampler name implies)."),
    cfg=typer.Option(None, help="Classifier-free guidance scale (default: the model's; 3 for the shipped one)."),
    rescale=typer.Option(0.0, help="Guidance rescale phi in [0, 1] (Lin et al. 2023)."),
    seed=typer.Option(0, help="Seed of the first image; image i uses seed + i."),
    n=typer.Option(1, help="How many images."),
    width=typer.Option(None, help="Width in pixels (a multiple of the latent factor)."),
    height=typer.Option(None, help="Height in pixels (a multiple of the latent factor)."),
    model=typer.Option(None, help="A text-to-image model folder (default: the model shipped with imagine)."),
    out=typer.Option(Path("outputs"), help="Folder for the PNGs (existing files are never overwritten)."),
)


@app.command()
def generate(
    prompt: str = typer.Argument("", help="What to draw. A1111 emphasis works: (word:1.3), [word]."),
    negative: str = _PROMPT_OPTS["negative"], steps: int | None = _PROMPT_OPTS["steps"],
    sampler: str | None = _PROMPT_OPTS["sampler"], schedule: str | None = _PROMPT_OPTS["schedule"],
    cfg: float | None = _PROMPT_OPTS["cfg"], rescale: float = _PROMPT_OPTS["rescale"], seed: int = _PROMPT_OPTS["seed"],
    n: int = _PROMPT_OPTS["n"], width: int | None = _PROMPT_OPTS["width"], height: int | None = _PROMPT_OPTS["height"],
    model: Path | None = _PROMPT_OPTS["model"], out: Path = _PROMPT_OPTS["out"],
    from_image: Path | None = typer.Option(None, "--from", help="Regenerate this image from its metadata."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 autocast for the network (faster on CPUs with bf16)."),
    batched: bool = typer.Option(False, "--batched", help="One network call for all images: faster, but an image "
                                 "then depends on the batch in the last bits (default: batch-invariant)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the UNet: about a minute first, then "
                                 "faster steps; pays off for many images in one process."),
    rerank: int = typer.Option(1, help="Make K candidates per image and keep the one the CLIP scorer likes best."),
    clip: Path | None = typer.Option(None, help="CLIP scorer folder for --rerank (default: the shipped one)."),
) -> None:
    """Text to image. With --from IMAGE, regenerate an image from the settings it carries."""
    if from_image is not None:
        from imagine.io.png import read_png_metadata
        from imagine.pipelines.generate import Settings

        try:
            _, record = read_png_metadata(from_image)
        except ValueError as err:
            _fail(str(err))
        if record is None:
            _fail(f"{from_image} carries no imagine metadata (A1111's text alone does not pin the model)")
        if record.get("kind") != "txt2img":
            _fail(f"{from_image} was made by {record.get('kind')}; --from regenerates txt2img images")
        settings = Settings(**record["settings"])
        _run_generation("txt2img", model or Path(record["model"]["path"]), settings, out)
        return
    if not prompt:
        _fail("give a prompt, or --from IMAGE")
    if rerank < 1:
        _fail(f"--rerank takes K >= 1 candidates per image, got {rerank}")
    _run_generation("txt2img", model, _settings(prompt, negative, steps, sampler, schedule, cfg, rescale, seed, n,
                                                width, height, precision=precision, batched=batched,
                                                compile=compile), out,
                    rerank=rerank, clip=clip)


@app.command()
def img2img(
    image: Path = typer.Argument(..., help="The init image."),
    prompt: str = typer.Argument(..., help="What it should become."),
    strength: float = typer.Option(0.75, help="In (0, 1]: how much of the schedule to run (1 ignores the image)."),
    negative: str = _PROMPT_OPTS["negative"], steps: int | None = _PROMPT_OPTS["steps"],
    sampler: str | None = _PROMPT_OPTS["sampler"], schedule: str | None = _PROMPT_OPTS["schedule"],
    cfg: float | None = _PROMPT_OPTS["cfg"], rescale: float = _PROMPT_OPTS["rescale"], seed: int = _PROMPT_OPTS["seed"],
    n: int = _PROMPT_OPTS["n"], width: int | None = _PROMPT_OPTS["width"], height: int | None = _PROMPT_OPTS["height"],
    model: Path | None = _PROMPT_OPTS["model"], out: Path = _PROMPT_OPTS["out"],
) -> None:
    """Image to image (SDEdit): noise the image to `strength` and denoise toward the prompt."""
    _run_generation("img2img", model, _settings(prompt, negative, steps, sampler, schedule, cfg, rescale, seed, n,
                                                width, height, strength=strength), out, init=image)


@app.command()
def inpaint(
    image: Path = typer.Argument(..., help="The image to edit."),
    mask: Path = typer.Argument(..., help="Same size; white = regenerate, black = keep."),
    prompt: str = typer.Argument(..., help="What to draw in the masked region."),
    strength: float = typer.Option(1.0, help="In (0, 1]: 1 regenerates the masked region from scratch."),
    mask_blur: int = typer.Option(4, help="Gaussian blur radius of the mask, in pixels."),
    negative: str = _PROMPT_OPTS["negative"], steps: int | None = _PROMPT_OPTS["steps"],
    sampler: str | None = _PROMPT_OPTS["sampler"], schedule: str | None = _PROMPT_OPTS["schedule"],
    cfg: float | None = _PROMPT_OPTS["cfg"], rescale: float = _PROMPT_OPTS["rescale"], seed: int = _PROMPT_OPTS["seed"],
    n: int = _PROMPT_OPTS["n"], model: Path | None = _PROMPT_OPTS["model"], out: Path = _PROMPT_OPTS["out"],
) -> None:
    """Inpainting: regenerate the masked region, keep the rest."""
    _run_generation("inpaint", model, _settings(prompt, negative, steps, sampler, schedule, cfg, rescale, seed, n,
                                                None, None, strength=strength, mask_blur=mask_blur),
                    out, init=image, mask=mask)


@app.command()
def info(image: Path = typer.Argument(..., help="A PNG made by imagine or AUTOMATIC1111.")) -> None:
    """Print an image's generation parameters (A1111's text, parsed) and imagine's full JSON record."""
    from imagine.io.png import parse_a1111, read_png_metadata

    try:
        parameters, record = read_png_metadata(image)
    except ValueError as err:
        _fail(str(err))
    if parameters is None and record is None:
        _fail(f"{image} carries no generation parameters")
    if parameters is not None:
        typer.echo("parameters (A1111):")
        typer.echo(parameters)
        typer.echo("")
        typer.echo("parsed:")
        for key, value in parse_a1111(parameters).items():
            typer.echo(f"  {key}: {value}")
    if record is not None:
        typer.echo("")
        typer.echo("imagine record:")
        typer.echo(json.dumps(record, indent=2, sort_keys=True))


eval_app = typer.Typer(help="Evaluate models: ShapesEval (prompt following), CLIP score, FID/KID.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("shapes")
def eval_shapes(
    model: Path | None = typer.Option(None, help="A text-to-image model folder (default: the shipped model)."),
    sampler: str | None = typer.Option(None, help="Sampler: ours or A1111's name (default: the model's)."),
    steps: int | None = typer.Option(None, help="Sampling steps (default: the model's)."),
    cfg: float | None = typer.Option(None, help="Classifier-free guidance scale (default: the model's)."),
    per_category: int = typer.Option(25, help="Prompts per category (6 categories, one image each)."),
    seed: int = typer.Option(0, help="Seed of the prompt set (and of each prompt's image)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write every verdict and the scores here."),
    failures: int = typer.Option(5, help="Print this many failures with their reasons."),
    rerank: int = typer.Option(1, help="Judge the best of K candidates per prompt by CLIP score (as generate "
                                       "--rerank K makes them)."),
    clip: Path | None = typer.Option(None, help="CLIP scorer folder for --rerank (default: the shipped one)."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 autocast (does the faster mode cost accuracy?)."),
) -> None:
    """ShapesEval (GenEval's categories for builtin:shapes): how often images show what the prompt asks."""
    import numpy as np
    from tqdm import tqdm

    from imagine.evaluation.shapes_eval import evaluate, prompt_set
    from imagine.pipelines.generate import Settings, txt2img
    from imagine.pipelines.unconditional import to_uint8

    try:
        loaded, encoder = _load_t2i(model)
        prompts = prompt_set(per_category, seed)
        base = Settings(precision=precision).with_model_defaults(loaded.spec, steps, sampler, cfg).validate()
        steps, sampler, cfg = base.steps, base.sampler, base.cfg_scale
        if rerank < 1:
            raise ValueError(f"--rerank takes K >= 1 candidates per prompt, got {rerank}")
        scorer = _load_scorer(clip)[0] if rerank > 1 else None
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    bar = tqdm(total=len(prompts), desc="ShapesEval", unit="image")

    def make_image(p):
        s = Settings(prompt=p.prompt, steps=steps, sampler=sampler, cfg_scale=cfg, seed=p.seed, precision=precision)
        if scorer is None:
            return txt2img(loaded, s, encoder)
        from imagine.pipelines.rerank import txt2img_reranked

        return txt2img_reranked(loaded, s, encoder, scorer, rerank)[0].image[None]

    def make_images(chunk):
        return np.concatenate([to_uint8(make_image(p)) for p in chunk])

    report = evaluate(prompts, make_images, progress=bar.update)
    bar.close()
    typer.echo(report.table())
    bad = [v for v in report.verdicts if not v.ok]
    for v in bad[:failures]:
        typer.echo(f"  fail [{v.category}] {v.prompt!r} (seed {v.seed}): {v.reason}")
    if json_path is not None:
        data = {**report.to_json(), "settings": {"model": str(loaded.path), "sampler": sampler, "steps": steps,
                                                 "cfg": cfg, "per_category": per_category, "seed": seed,
                                                 "rerank": rerank, "precision": precision}}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=2))
        typer.echo(f"written: {json_path}")


class FeatureSpace(str, Enum):
    clip = "clip"
    inception = "inception"


@eval_app.command("fid")
def eval_fid(
    generated: Path = typer.Argument(..., help="Folder of generated images (png, jpg, webp)."),
    reference: str = typer.Argument(..., help="Folder of reference images, or builtin:shapes (held-out scenes "
                                              "rendered by the dataset at the generated images' size)."),
    features: FeatureSpace = typer.Option(FeatureSpace.clip, help="Feature space: clip (the shipped shapes "
                                          "scorer, or --clip DIR) or inception (pytorch-fid's, needs --inception)."),
    clip: Path | None = typer.Option(None, help="A CLIP-style model folder (default: the shipped shapes-clip)."),
    inception: Path | None = typer.Option(None, envvar="IMAGINE_INCEPTION_WEIGHTS",
                                          help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (a local file: "
                                               "imagine downloads nothing)."),
    size: int | None = typer.Option(None, help="Resize every image to SIZE x SIZE first (default: keep their "
                                               "size; the feature extractor resizes, as pytorch-fid does)."),
    reference_count: int = typer.Option(1000, help="How many scenes builtin:shapes renders as the reference."),
    kid_subsets: int = typer.Option(50, help="KID: random subsets averaged."),
    kid_subset_size: int = typer.Option(100, help="KID: images per subset (capped at the smaller set)."),
    cache: Path | None = typer.Option(None, help="Where reference features are cached (default: "
                                                 "$XDG_CACHE_HOME/imagine/fid)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the figures here."),
) -> None:
    """FID and KID of a folder of images against a reference, in CLIP or Inception feature space."""
    import os

    from PIL import Image

    from imagine.evaluation.fid import (
        cached_reference,
        compare,
        extract,
        folder_batches,
        folder_id,
        folder_images,
        shapes_reference_batches,
    )
    from imagine.io.checkpoint import CheckpointError
    from imagine.io.png import file_hash
    from imagine.models import load_clip, load_fid_inception

    if cache is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imagine" / "fid"
    try:
        if features is FeatureSpace.inception:
            if inception is None:
                _fail("Inception features need pytorch-fid's weight file, and imagine downloads nothing: pass "
                      "--inception PATH/pt_inception-2015-12-05-6726825d.pth (pytorch-fid's GitHub releases), "
                      "or use --features clip")
            extractor = load_fid_inception(inception)
            extractor_id = f"inception:{file_hash(inception, 16)}"
        else:
            from imagine.weights import default_clip

            clip_dir = clip if clip is not None else default_clip()
            extractor = load_clip(clip_dir).fid_features
            extractor_id = f"clip:{file_hash(Path(clip_dir) / 'model.safetensors', 16)}"
        first_image = folder_images(generated)[0]  # a missing or empty folder fails before any work
        if reference == "builtin:shapes":
            with Image.open(first_image) as first:
                side = size or first.width
            source_id = f"builtin:shapes:{side}:{reference_count}"

            def reference_batches():
                return shapes_reference_batches(side, reference_count)
        else:
            source_id = f"{folder_id(Path(reference))}:{size}"

            def reference_batches():
                return folder_batches(Path(reference), size)
        extractor_id += f":{size}"
        ref = cached_reference(extractor, extractor_id, source_id, reference_batches, cache)
        gen = extract(extractor, folder_batches(generated, size))
        result = compare(gen, ref, kid_subsets, kid_subset_size)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        _fail(str(err))
    low, high = result.kid.interval
    typer.echo(f"features   {features.value} ({extractor_id.split(':')[1]})")
    typer.echo(f"images     {result.n_generated} generated, {result.n_reference} reference ({reference})")
    typer.echo(f"FID        {result.fid:.4f}")
    typer.echo(f"KID        {result.kid.mean:.6f} +- {result.kid.std:.6f} "
               f"(95% interval {low:.6f} .. {high:.6f}, {result.kid.subsets} subsets)")
    if min(result.n_generated, result.n_reference) < 2048 and features is FeatureSpace.inception:
        typer.echo("note: FID is biased upward below a few thousand images; compare KID, which is unbiased")
    if json_path is not None:
        data = {**result.to_json(), "features": features.value, "extractor": extractor_id, "reference": reference,
                "generated": str(generated)}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=2))
        typer.echo(f"written: {json_path}")


def _default_model() -> Path:
    from imagine.weights import default_model

    try:
        return default_model()
    except FileNotFoundError as err:
        _fail(str(err))


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind; 0.0.0.0 exposes the server to your network."),
    port: int = typer.Option(7860, help="Port (A1111's default)."),
    model: list[Path] = typer.Option(None, help="Text-to-image model folder; repeat to offer several "
                                                "(default: the model shipped with imagine)."),
    out: Path = typer.Option(Path("outputs"), help="Where generated PNGs are saved."),
    api_auth: str | None = typer.Option(None, help="USER:PASS: basic auth on every route (A1111's --api-auth)."),
    max_queue: int = typer.Option(16, help="Jobs that may wait; more are answered 429 with Retry-After."),
    max_steps: int = typer.Option(150, help="Most sampling steps per request."),
    max_batch: int = typer.Option(8, help="Most images per request."),
    max_pixels: int = typer.Option(512 * 512, help="Most pixels (width x height) per image."),
    max_request_mb: float = typer.Option(16, help="Largest request body, in MiB."),
) -> None:
    """Serve the HTTP API (ours at /api/v1, A1111's at /sdapi/v1), the web UI at / and API docs at /docs."""
    import uvicorn

    from imagine.io.checkpoint import CheckpointError
    from imagine.server import Limits, create_app

    try:
        if not model:
            from imagine.weights import default_model

            model = [default_model()]
        limits = Limits(max_pixels=max_pixels, max_steps=max_steps, max_batch=max_batch,
                        max_request_bytes=int(max_request_mb * 1024 * 1024))
        server_app = create_app(list(model), out_dir=out, limits=limits, max_queue=max_queue, api_auth=api_auth)
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        _fail(str(err))
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach this machine can use the server"
                   + ("" if api_auth else " (consider --api-auth USER:PASS)"), err=True)
    typer.echo(f"imagine serving on http://{host}:{port} (web UI at /, API docs at /docs)")
    uvicorn.run(server_app, host=host, port=port, log_level="warning")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
