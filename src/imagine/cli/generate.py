"""imagine generate, img2img, inpaint, sample, info."""

from __future__ import annotations

import json
import warnings
from enum import Enum
from pathlib import Path

import typer

from imagine.cli.app import EDIT, GENERATE, app, default_model, fail


# The request's Literal options as the CLI's choices (pipelines/settings.py is the schema; importing it would
# cost `imagine --help` torch's seconds, so tests/e2e/test_request_schema.py checks these against it)
class Schedule(str, Enum):
    default = "default"
    karras = "karras"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class Backend(str, Enum):
    torch = "torch"
    onnxruntime = "onnxruntime"
    onnxruntime_int8 = "onnxruntime-int8"


class ResizeMode(str, Enum):
    just_resize = "just_resize"
    crop_and_resize = "crop_and_resize"
    resize_and_fill = "resize_and_fill"
    latent_upscale = "latent_upscale"


class InpaintFill(str, Enum):
    fill = "fill"
    original = "original"
    latent_noise = "latent_noise"
    latent_nothing = "latent_nothing"


def _bool(value: str | bool) -> bool:
    """true/false, yes/no, 1/0 (for options given a value, as --lora-strict false)."""
    import click

    return click.BOOL.convert(value, None, None)


_OPTS = dict(
    backend=typer.Option(Backend.torch, help="What runs the networks: torch, onnxruntime (an ONNX export, made once "
                                       "per model into ~/.cache/imagine/onnx) or onnxruntime-int8 (its UNet "
                                       "dynamically quantized)."),
    tile=typer.Option(None, help="Sample in overlapping tiles of this many pixels a side (default: whole images): "
                                 "for sizes whose activations would not fit in memory; seams are feathered away."),
    vae_tile=typer.Option(None, help="Decode with the VAE in overlapping tiles of this many pixels a side (default: "
                                     "whole, or tiles when the whole would not fit in memory: said and recorded)."),
    fast=typer.Option(False, "--fast", help="Use the shipped latent consistency model (4 steps, LCM sampler): an "
                                            "image in a fraction of a second on a CPU."),
    negative=typer.Option("", "--negative", help="Negative prompt."),
    steps=typer.Option(None, help="Sampling steps (default: the model's; 25 for the shipped one)."),
    sampler=typer.Option(None, help="Sampler: ours or A1111's name ('DPM++ 2M Karras'; default: the model's)."),
    schedule=typer.Option(None, case_sensitive=False, help="Sigma schedule: default or karras (default: what the "
                                                              "sampler name implies)."),
    cfg=typer.Option(None, help="Classifier-free guidance scale (default: the model's; 3 for the shipped one)."),
    rescale=typer.Option(0.0, help="Guidance rescale phi in [0, 1] (Lin et al. 2023)."),
    distilled_cfg=typer.Option(3.5, help="Flux [dev]'s distilled guidance scale (Forge's Distilled CFG Scale): an "
                                         "input of guidance-distilled models, which run without CFG (cfg 1)."),
    image_cfg=typer.Option(1.5, "--image-cfg", help="Instruct models (InstructPix2Pix): how closely to keep to the "
                                                    "image (A1111's Image CFG scale)."),
    mask_weight=typer.Option(1.0, "--mask-weight", help="Inpainting models: how much of the masked region their "
                                                        "image input hides (A1111's inpainting conditioning mask "
                                                        "strength; 0 shows them the whole image)."),
    resolution_binning=typer.Option(True, "--resolution-binning/--no-resolution-binning",
                                    help="PixArt: generate at the closest of the aspect ratios the model trained at, "
                                         "then resize and centre-crop to the size asked (diffusers' default)."),
    seed=typer.Option(0, help="Seed of the first image; image i uses seed + i. -1: a random one (printed)."),
    n=typer.Option(1, help="How many images."),
    width=typer.Option(None, help="Width in pixels (a multiple of the latent factor)."),
    height=typer.Option(None, help="Height in pixels (a multiple of the latent factor)."),
    model=typer.Option(None, help="A model: an imagine or diffusers folder, a .safetensors checkpoint (SD 1.x, "
                                  "2.x, SDXL) or a name in the models folder (default: the shipped model)."),
    vae=typer.Option(None, help="A separate VAE (file, folder or name in models/VAE) replacing the model's own."),
    text_encoder=typer.Option(None, "--text-encoder", help="A separate part of an SD3 or Flux transformer file "
                                                           "(clip_l, clip_g, t5xxl or ae .safetensors; a file or a "
                                                           "name in models/text_encoders): Forge's modules; repeat "
                                                           "for several. Unnamed parts are looked for beside the "
                                                           "file and in the models folder."),
    lora=typer.Option(None, "--lora", help="A LoRA: NAME (in the models folder's Lora/) or FILE, with :WEIGHT "
                                           "(default 1); repeat for several. <lora:NAME:WEIGHT> in the prompt "
                                           "works too, as in A1111."),
    embedding=typer.Option(None, "--embedding", help="A textual-inversion embedding (FILE or NAME in the models "
                                                     "folder's embeddings/), used where its name is written in "
                                                     "the prompt; repeat for several. Embeddings in embeddings/ "
                                                     "are found by name without this."),
    lora_strict=typer.Option("true", "--lora-strict", parser=_bool, metavar="true|false",
                             help="false: a LoRA key that fits no module is a printed warning, not an error."),
    allow_pickle=typer.Option(False, "--allow-pickle", help="Read .ckpt pickles (with torch.load(weights_only=True) "
                                                           "only); by default only .safetensors are read."),
    models_dir=typer.Option(None, help="A1111-style models folder (Stable-diffusion/, VAE/, Lora/, ...); "
                                       "default: ./models when it exists."),
    out=typer.Option(Path("outputs"), help="Folder for the PNGs (existing files are never overwritten)."),
    clip_skip=typer.Option(None, help="Text states from the N-th last layer of the text encoder (A1111's Clip "
                                      "skip; 1: the last; default: the model's)."),
    noise_seed_delta=typer.Option(0, help="Stochastic samplers draw their noise from seed + this (A1111's eta "
                                          "noise seed delta, ENSD); the starting noise stays the seed's."),
    control=typer.Option(None, "--control", help="A ControlNet unit: TYPE[@MODEL]:IMAGE[:WEIGHT[:START:END]]. TYPE "
                                                 "is the preprocessor run on IMAGE (canny, scribble, segmentation, "
                                                 "keypoints, tile; none: IMAGE already is the condition); MODEL a "
                                                 "name in models/ControlNet or a path (default: the one trained "
                                                 "for TYPE); START and END are fractions of the steps. Repeat for "
                                                 "several (multi-ControlNet)."),
    adapter=typer.Option(None, "--adapter", help="A T2I-Adapter unit, written as --control; repeat for a weighted "
                                                 "sum of several."),
    control_mode=typer.Option("balanced", help="balanced, prompt (My prompt is more important) or control "
                                               "(ControlNet is more important: the conditional branch only)."),
    image_prompt=typer.Option(None, "--image-prompt", help="An image prompt (IP-Adapter): [TYPE[@MODEL]:]IMAGE"
                                                           "[:SCALE[:START:END]]. TYPE: content (default), "
                                                           "palette or intensity (Composer's global conditions); "
                                                           "MODEL a name in models/ipadapter or a path (default: "
                                                           "the first of TYPE that fits); SCALE the image's "
                                                           "weight (default 1). Repeat for several."),
    offload=typer.Option("auto", "--offload", help="On a GPU: auto (keep every network on it when they fit beside "
                                                   "the work, else bring each there only to run: model, or one layer "
                                                   "at a time: sequential), none, model or sequential. The pixels "
                                                   "are the same."),
    device=typer.Option("auto", "--device", help="Where the networks run: auto (a CUDA GPU, then Apple's MPS, then "
                                                 "the CPU), cpu, cuda, cuda:N or mps. The starting noise is drawn "
                                                 "on the CPU, so a seed gives the same image on any device."),
    plan=typer.Option(False, "--plan", help="Print the memory each stage will need (weights, sampling, decoding) "
                                            "against what the device has free, and stop without running."),
    refiner=typer.Option(None, "--refiner", help="A second model that takes the last steps (A1111's Refiner: the "
                                                  "SDXL refiner, or any model of the same latent space): a name in "
                                                  "the models folder or a path."),
    refiner_switch_at=typer.Option(0.8, "--refiner-switch-at", help="The fraction of the schedule after which the "
                                                                  "refiner takes over (A1111's Refiner switch at)."),
    watermark=typer.Option(False, "--watermark", help="Write Stable Diffusion's invisible watermark (DWT-DCT) "
                                                      "into the pixels (images of 256 x 256 or more); imagine info "
                                                      "finds it."),
    sign_key=typer.Option(None, "--sign-key", help="Sign each image's record with this Ed25519 private key (PEM; "
                                                   "imagine keygen makes one): imagine info --verify checks it."),
    left=typer.Option(0, "--left", help="Outpainting: pixels added on the left (the new border is inpainted)."),
    right=typer.Option(0, "--right", help="Outpainting: pixels added on the right."),
    up=typer.Option(0, "--up", help="Outpainting: pixels added at the top."),
    down=typer.Option(0, "--down", help="Outpainting: pixels added at the bottom."),
    resize_mode=typer.Option(ResizeMode.just_resize, help="How the image meets the output size: stretch, crop "
                                                          "to cover, fit and fill the borders, or resize the "
                                                          "latent (A1111's resize modes)."),
)


def _model_option(model: str | None, fast: bool) -> str | None:
    """--model, or the shipped LCM for --fast (both at once is refused)."""
    if fast and model is not None:
        fail("--fast picks the shipped LCM; leave out --model (or distil your own: imagine distill-lcm)")
    if fast:
        from imagine.weights import fast_model

        return str(fast_model())
    return model


def _settings(prompt, negative, steps, sampler, schedule, cfg, rescale, seed, n, width, height, **more):
    from imagine.pipelines.settings import Settings

    if seed == -1:  # A1111's "random": drawn here, printed, and recorded in every PNG like any seed
        import secrets

        seed = secrets.randbelow(2**31)
        typer.echo(f"seed: {seed}", err=True)

    more = {k: (v.value if isinstance(v, Enum) else v) for k, v in more.items()}
    schedule = schedule.value if isinstance(schedule, Enum) else schedule
    return Settings(prompt=prompt, negative_prompt=negative, steps=steps, sampler=sampler, schedule=schedule,
                    cfg_scale=cfg, guidance_rescale=rescale, seed=seed, n=n, width=width, height=height, **more)


def _run(kind: str, model: str | Path | None, settings, out: Path, init: Path | None = None,
         mask: Path | None = None, rerank: int = 1, clip: Path | None = None, vae: str | Path | None = None,
         allow_pickle: bool = False, models_dir: Path | None = None, weights_dtype: str = "fp32",
         lora: list[str] | None = None, embedding: list[str] | None = None, lora_strict: bool = True,
         controls: list | None = None, image_prompts: list | None = None, size: int | None = None,
         expect_model: dict | None = None, text_encoder: list[str] | None = None,
         inversion_file: Path | None = None, save_inversion: Path | None = None,
         sign_key: Path | None = None, refiner_path: Path | None = None, device: str = "auto",
         plan: bool = False, offload: str = "auto") -> list[Path]:
    """Generate, img2img and inpaint: build the one Request, run it with a progress bar, write the PNGs.
    size: txt2img's final longer side, reached by the SR upscaler in the settings (the scale is set from the
    model's size here). expect_model: --from's record of the model; other weights are refused, named."""
    from tqdm import tqdm

    from imagine.io import models_dir as md
    from imagine.io.checkpoint import CheckpointError
    from imagine.io.provenance import load_signing_key
    from imagine.pipelines import request as r

    try:
        models_dir = models_dir if models_dir is not None else md.default_models_dir()
        path = md.resolve(model, models_dir) if model is not None else default_model()
        vae_path = md.resolve(vae, models_dir, "vae") if vae is not None else None
        modules = [md.resolve(m, models_dir, "text_encoders") for m in text_encoder or ()]
        loaded, encoder = r.load_text_model(path, vae=vae_path, allow_pickle=allow_pickle,
                                            weights_dtype=weights_dtype, modules=modules, device=device,
                                            offload=offload)
        settings = settings.with_model_defaults(loaded.spec, settings.steps, settings.sampler, settings.cfg_scale)
        if expect_model and expect_model.get("unet_sha256_10") and loaded.weights_file.exists():
            from imagine.io.png import file_hash

            have = file_hash(loaded.weights_file)
            if have != expect_model["unet_sha256_10"]:
                raise ValueError(f"the image was made with {expect_model.get('name')!r} (weights sha256 "
                                 f"{expect_model['unet_sha256_10']}); {loaded.name} has {have}: pass --model with "
                                 "those weights, or --from would make other pixels")
        if size is not None:
            from dataclasses import replace

            from imagine.pipelines.generate import output_size
            from imagine.pipelines.settings import MAX_HIRES_SCALE

            base = max(output_size(loaded, settings))
            if size <= base:
                raise ValueError(f"--size {size} is not larger than the model's {base} px output")
            if size > MAX_HIRES_SCALE * base:
                raise ValueError(f"--size {size} is {size / base:g} times the model's {base} px output; super-"
                                 f"resolution goes up to {MAX_HIRES_SCALE:g} times: at most --size "
                                 f"{int(MAX_HIRES_SCALE * base)}")
            settings = replace(settings, hires_scale=size / base)
        refiner = None
        if settings.refiner:  # A1111's refiner: loaded as any model is (--from: the file the image names)
            where = refiner_path or md.resolve(settings.refiner, models_dir)
            refiner = r.load_text_model(where, allow_pickle=allow_pickle, weights_dtype=weights_dtype, device=device,
                                        offload=offload)
            if expect_model and (expect_model.get("refiner") or {}).get("unet_sha256_10") \
                    and refiner[0].weights_file.exists():
                from imagine.io.png import file_hash

                want, have = expect_model["refiner"]["unet_sha256_10"], file_hash(refiner[0].weights_file)
                if want != have:
                    raise ValueError(f"the image was refined with weights of sha256 {want}; {where} has {have}: "
                                     "pass those weights, or --from would make other pixels")
        init_image = r.open_image(init, "image") if init is not None else None  # a clear error first
        mask_image = r.open_image(mask, "mask") if mask is not None else None
        if plan:  # what it would hold, and no work
            plans = r.Request(kind, settings, init_image=init_image, mask=mask_image).memory_plans(loaded, encoder)
            for p in plans:
                typer.echo("\n".join(p.lines()))
            if not all(p.fits for p in plans):
                raise typer.Exit(1)
            return []
        extra = {}
        if init is not None:
            extra["init_image"] = r.input_record(init)
        if mask is not None:
            extra["mask"] = r.input_record(mask)
        loras = tuple(_lora_option(item) for item in lora or [])
        if not lora_strict:
            extra["lora_strict"] = False
        request = r.Request(kind, settings, init_image=init_image, mask=mask_image, rerank=rerank,
                            extra=extra, loras=loras, models_dir=models_dir, embeddings=tuple(embedding or ()),
                            lora_strict=lora_strict, controls=tuple(controls or ()),
                            image_prompts=tuple(image_prompts or ()),
                            sign_key=load_signing_key(sign_key) if sign_key is not None else None,
                            refiner=refiner).check(loaded)
        scorer = r.load_scorer(clip) if rerank > 1 else None
        from imagine.pipelines.output import save
        from imagine.pipelines.upscale import hires_steps_total

        per_image = request.settings.steps * rerank + hires_steps_total(request.settings, request.resolved_upscaler)
        if kind == "edit":
            request = _inversion(request, loaded, encoder, inversion_file, save_inversion)
            s = request.settings  # the inversion's steps (and null-text's), unless it was read, then the edit's
            run = max(1, round(s.strength * s.steps))
            per_image = run * (1 + (request.inversion is None) * (1 + s.null_text))
        for warning in request.warnings:
            typer.echo(f"warning: {warning}", err=True)
        # what the library warns about while it runs (a LoRA with --lora-strict false leaving layers out) is
        # said as the CLI says everything: one "warning:" line each, every time
        with warnings.catch_warnings(record=True) as caught, \
                tqdm(total=per_image * request.settings.n, desc=kind, unit="step", leave=False) as bar:
            warnings.simplefilter("always")
            results = r.run(request, loaded, encoder, scorer=scorer, callback=lambda info: bar.update(1))
        ours = [w for w in caught if issubclass(w.category, UserWarning) and "imagine" in Path(w.filename).parts]
        for warning in dict.fromkeys(str(w.message) for w in ours):
            typer.echo(f"warning: {warning}", err=True)
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    paths = save(results, out)
    for path in paths:
        typer.echo(str(path))
    return paths


def _inversion(request, model, encoder, read: Path | None, write: Path | None):
    """An edit request with its inversion read from a file (checked to fit), or made now and written."""
    from dataclasses import replace

    from tqdm import tqdm

    from imagine.pipelines import inversion as inv
    from imagine.pipelines.request import attached

    identity = inv.inversion_identity(model, request.settings, request.extra["init_image"]["sha256_10"])
    if read is not None:
        return replace(request, inversion=inv.load_inversion(read, identity))
    if write is None:
        return request
    s = request.settings
    run = max(1, round(s.strength * s.steps))
    with tqdm(total=run * (1 + s.null_text), desc="inversion", unit="step", leave=False) as bar, \
            attached(request, model, encoder):
        made = inv.invert(model, s, request.init_image, encoder, callback=lambda info: bar.update(1),
                          attachments=request.attached)
    inv.save_inversion(write, made, identity)
    typer.echo(f"inversion: {write}", err=True)
    return replace(request, inversion=made)


def _lora_option(item: str | tuple) -> tuple[str, float]:
    """--lora NAME[:WEIGHT] -> (NAME, WEIGHT)."""
    if isinstance(item, tuple):
        return item
    name, sep, weight = item.rpartition(":")
    if sep:
        try:
            return name, float(weight)
        except ValueError:
            pass
    return item, 1.0


def _control_units(control: list[str] | None, adapter: list[str] | None, mode: str) -> list:
    """--control and --adapter values as ControlUnits (the preprocessor, model, image and numbers of each)."""
    from imagine.adapters.control import ControlUnit
    from imagine.pipelines.request import input_record, open_image

    units = []
    for kind, items in (("controlnet", control or []), ("t2i_adapter", adapter or [])):
        for item in items:
            head, sep, rest = item.partition(":")
            if not sep or not rest:
                raise ValueError(f"{item!r}: write a control unit as TYPE[@MODEL]:IMAGE[:WEIGHT[:START:END]]")
            module, _, model = head.partition("@")
            parts = rest.split(":")
            numbers = _numbers_tail(item, parts, 3)
            path = Path(":".join(parts))
            weight, start, end = (numbers + [1.0, 0.0, 1.0][len(numbers):]) if numbers else (1.0, 0.0, 1.0)
            units.append(ControlUnit(module, open_image(path, "control image"), model=model or None, weight=weight,
                                     start=start, end=end, mode=mode, kind=kind, input=input_record(path)).check())
    return units


def _numbers_tail(item: str, parts: list[str], most: int) -> list[float]:
    """Up to ``most`` trailing numbers taken off ``parts`` (WEIGHT, or WEIGHT:START:END)."""
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < most:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    if len(numbers) == 2:
        raise ValueError(f"{item!r}: give START and END together (fractions of the steps), after the weight")
    return numbers


def image_prompt_units(items: list[str] | None) -> list:
    """--image-prompt values as ImagePromptUnits: [TYPE[@MODEL]:]IMAGE[:SCALE[:START:END]]."""
    from imagine.adapters.image_prompt import TYPES, ImagePromptUnit
    from imagine.pipelines.request import input_record, open_image

    units = []
    for item in items or []:
        parts = item.split(":")
        kind, model = "content", None
        head, _, named = parts[0].partition("@")
        if len(parts) > 1 and head in TYPES:
            kind, model = head, named or None
            parts = parts[1:]
        numbers = _numbers_tail(item, parts, 3)
        scale, start, end = (numbers + [1.0, 0.0, 1.0][len(numbers):]) if numbers else (1.0, 0.0, 1.0)
        path = Path(":".join(parts))
        units.append(ImagePromptUnit(open_image(path, "image prompt"), scale, model=model, type=kind, start=start,
                                     end=end, input=input_record(path)).check())
    return units


def _prompts(items) -> list:
    try:
        return image_prompt_units(items)
    except ValueError as err:
        fail(str(err))


def _units(control, adapter, mode) -> list:
    try:
        return _control_units(control, adapter, mode)
    except ValueError as err:
        fail(str(err))


def _from_image(image: Path, model: str | None, out: Path, **options) -> None:
    """Regenerate a txt2img, img2img or inpaint image from the settings it carries: the same model (its
    weights' hash checked), and for img2img and inpaint the same input files (their hashes checked)."""
    from dataclasses import fields

    from imagine.io.png import file_hash, read_png_metadata
    from imagine.pipelines.settings import Settings

    try:
        _, record = read_png_metadata(image)
    except ValueError as err:
        fail(str(err))
    if record is None:
        fail(f"{image} carries no imagine metadata (A1111's text alone does not pin the model)")
    kind = record.get("kind")
    if kind not in ("txt2img", "img2img", "inpaint", "edit"):
        fail(f"{image} was made by {kind}; --from regenerates txt2img, img2img, inpaint and edit images (imagine "
             "upscale --from redoes upscales)")
    inputs: dict[str, Path] = {}
    for key, what in (("init_image", "image"), ("mask", "mask")):
        if kind == "txt2img" or (key == "mask" and kind != "inpaint"):
            continue
        if key == "mask" and key not in record and any(record["settings"].get(f"outpaint_{side}") for side in
                                                       ("left", "right", "up", "down")):
            continue  # outpainted without a mask: the borders are the mask
        where = record.get(key) or {}
        if "path" not in where:
            fail(f"{image} was made by {kind} from a {what} it does not locate (a server's request carries it "
                 f"inline): run imagine {kind} with that {what}, and these settings, yourself")
        path = Path(where["path"])
        if not path.is_file():
            fail(f"{image} was made from the {what} at {path}, which no longer exists: put it back there")
        if where.get("sha256_10") and file_hash(path) != where["sha256_10"]:
            fail(f"the {what} at {path} has changed since {image} was made (sha256 {file_hash(path)}, the image "
                 f"needs {where['sha256_10']}): --from would make other pixels")
        inputs[key] = path
    known = {f.name for f in fields(Settings)} | {"batched"}  # batched: older records (Settings.from_record)
    unknown = sorted(set(record["settings"]) - known)
    if unknown:
        fail(f"{image} records settings this imagine does not know ({', '.join(unknown)}): it was made by a "
             f"newer version ({record.get('versions', {}).get('imagine', '?')}); upgrade imagine")
    if model is None:
        model = Path(record["model"]["path"])
        if not model.exists():
            fail(f"{image} was made with the model at {model}, which no longer exists: pass --model PATH "
                 f"(the model named {record['model'].get('name')!r}, hash "
                 f"{record['model'].get('unet_sha256_10')})")
    vae = record["model"].get("vae")
    modules = record["model"].get("modules") or []  # a transformer file's separate parts, by file
    weights = {"bfloat16": "bf16", "float8_e4m3fn": "fp8"}.get(record.get("weights_dtype"), "fp32")
    # LoRAs given as options come back by file; those in the prompt's tags are found again by name
    loras = [(lo["path"], lo["weight"]) for lo in record.get("loras", []) if lo.get("source") == "option"]
    # embeddings given as options come back by file; those found by name in the prompt are found again
    embeddings = [e["path"] for e in record.get("embeddings", []) if e.get("source") == "option"]
    from imagine.adapters import image_prompt
    from imagine.adapters.control import unit_from_record

    controls = [unit_from_record(unit) for unit in record.get("controls", [])]  # the condition maps as stored
    prompts = [image_prompt.unit_from_record(unit) for unit in record.get("image_prompts", [])]
    refiner = record.get("refiner") or {}
    if refiner and not Path(refiner["path"]).exists():
        fail(f"{image} was refined by the model at {refiner['path']}, which no longer exists: put it back there")
    _run(kind, model, Settings.from_record(record["settings"]), out, vae=vae, weights_dtype=weights, lora=loras,
         embedding=embeddings, lora_strict=record.get("lora_strict", True), controls=controls,
         image_prompts=prompts, init=inputs.get("init_image"), mask=inputs.get("mask"),
         expect_model={**record["model"], "refiner": refiner}, text_encoder=modules,
         refiner_path=Path(refiner["path"]) if refiner else None, **options)


@app.command(rich_help_panel=GENERATE)
def generate(
    prompt: str = typer.Argument("", help="What to draw. A1111 emphasis works: (word:1.3), [word]."),
    negative: str = _OPTS["negative"], steps: int | None = _OPTS["steps"],
    sampler: str | None = _OPTS["sampler"], schedule: Schedule | None = _OPTS["schedule"],
    cfg: float | None = _OPTS["cfg"], rescale: float = _OPTS["rescale"], seed: int = _OPTS["seed"],
    n: int = _OPTS["n"], width: int | None = _OPTS["width"], height: int | None = _OPTS["height"],
    model: str | None = _OPTS["model"], out: Path = _OPTS["out"], vae: str | None = _OPTS["vae"],
    text_encoder: list[str] = _OPTS["text_encoder"],
    backend: Backend = _OPTS["backend"], fast: bool = _OPTS["fast"], tile: int | None = _OPTS["tile"],
    vae_tile: int | None = _OPTS["vae_tile"],
    allow_pickle: bool = _OPTS["allow_pickle"], models_dir: Path | None = _OPTS["models_dir"],
    lora: list[str] = _OPTS["lora"], embedding: list[str] = _OPTS["embedding"],
    lora_strict: str = _OPTS["lora_strict"],  # parsed to a bool
    clip_skip: int | None = _OPTS["clip_skip"], noise_seed_delta: int = _OPTS["noise_seed_delta"],
    distilled_cfg: float = _OPTS["distilled_cfg"], resolution_binning: bool = _OPTS["resolution_binning"],
    control: list[str] = _OPTS["control"], adapter: list[str] = _OPTS["adapter"],
    control_mode: str = _OPTS["control_mode"], image_prompt: list[str] = _OPTS["image_prompt"],
    from_image: Path | None = typer.Option(None, "--from", help="Regenerate this image from its metadata."),
    watermark: bool = _OPTS["watermark"], sign_key: Path | None = _OPTS["sign_key"],
    refiner: str | None = _OPTS["refiner"], refiner_switch_at: float = _OPTS["refiner_switch_at"],
    precision: Precision = typer.Option(Precision.fp32, help="fp32, or bf16 autocast for the network (faster on CPUs "
                                                            "with bf16)."),
    weights_dtype: str = typer.Option("fp32", help="What the UNet holds: fp32, bf16 (half the memory and faster "
                                      "under --precision bf16; its pixels differ from fp32 weights) or fp8 (scaled "
                                      "e4m3fn, a quarter of the memory, computed in bf16: with --precision bf16). "
                                      "A .gguf model's packed weights stay packed."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the UNet: about a minute first, then "
                                 "faster steps; pays off for many images in one process."),
    rerank: int = typer.Option(1, help="Make K candidates per image and keep the one the CLIP scorer likes best."),
    clip: Path | None = typer.Option(None, help="CLIP scorer folder for --rerank (default: the shipped one)."),
    size: int | None = typer.Option(None, help="Make the image this many pixels on its longer side by running "
                                               "super-resolution stages after the model (the prompt goes to each): "
                                               "the shipped 64 -> 256 stage, or --sr."),
    sr: str | None = typer.Option(None, "--sr", help="The SR stage or cascade for --size: a folder from imagine "
                                                     "train-sr, or a name in the models folder's SR/."),
    hires: float | None = typer.Option(None, "--hires", help="A1111's hires fix: upscale by this factor, then "
                                                            "img2img at --hires-strength with the same model."),
    hires_strength: float = typer.Option(0.7, help="Denoising strength of the hires pass (0: upscale only)."),
    hires_upscaler: str | None = typer.Option(None, help="How hires fix upscales: Lanczos (default), Bicubic, "
                                                         "Bilinear, Nearest, Latent, shapes-sr (the shipped SR "
                                                         "stage) or an SR stage's name or path."),
    hires_steps: int | None = typer.Option(None, help="Steps of the hires pass (default: as many as the first)."),
    noise_level: int | None = typer.Option(None, help="SR stages' noise-augmentation level (default: each "
                                                      "stage's own; higher invents more detail)."),
    device: str = _OPTS["device"], offload: str = _OPTS["offload"], plan: bool = _OPTS["plan"],
) -> None:
    """Text to image. With --from IMAGE, regenerate an image from the settings it carries."""
    if from_image is not None:
        _from_image(from_image, model, out, allow_pickle=allow_pickle, models_dir=models_dir, sign_key=sign_key,
                    device=device)
        return
    if not prompt and not image_prompt:
        fail("give a prompt or an --image-prompt, or --from IMAGE")
    if size is not None and hires is not None:
        fail("--size runs SR stages after the model and --hires is A1111's hires fix: choose one")
    if sr is not None and size is None:
        fail("--sr names the stages --size runs; add --size (or use --hires --hires-upscaler for hires fix)")
    upscale = {}
    if hires is not None:
        upscale = dict(hires_scale=hires, hires_strength=hires_strength, hires_steps=hires_steps,
                       hires_upscaler=hires_upscaler or "Lanczos")
    elif size is not None:
        from imagine.weights import SR_MODEL

        upscale = dict(hires_strength=0.0, hires_upscaler=sr or SR_MODEL.name)
    settings = _settings(prompt, negative, steps, sampler, schedule, cfg, rescale, seed, n, width, height,
                         precision=precision, compile=compile, clip_skip=clip_skip, noise_seed_delta=noise_seed_delta,
                         distilled_cfg_scale=distilled_cfg, resolution_binning=resolution_binning,
                         backend=backend, sr_noise_level=noise_level, tile=tile, vae_tile=vae_tile, watermark=watermark,
                         refiner=refiner, refiner_switch_at=refiner_switch_at, **upscale)
    _run("txt2img", _model_option(model, fast), settings, out, rerank=rerank, clip=clip, vae=vae, size=size,
         sign_key=sign_key,
         text_encoder=text_encoder, allow_pickle=allow_pickle, models_dir=models_dir, weights_dtype=weights_dtype,
         lora=lora,
         embedding=embedding, lora_strict=lora_strict, controls=_units(control, adapter, control_mode),
         image_prompts=_prompts(image_prompt), device=device, plan=plan, offload=offload)


@app.command(rich_help_panel=GENERATE)
def variations(
    image: Path = typer.Argument(..., help="The image to make variations of."),
    n: int = typer.Option(4, help="How many variations; variation i uses seed + i."),
    prompt: str = typer.Option("", help="Text to steer them with (default: none, the image alone)."),
    scale: float = typer.Option(1.0, help="The image prompt's weight."),
    ip_adapter: str | None = typer.Option(None, "--ip-adapter", help="The IP-Adapter (name in models/ipadapter or "
                                          "path; default: the first content adapter that fits the model)."),
    kind: str = typer.Option("content", "--type", help="Which kind of adapter to look for when none is named: "
                                                     "content, palette or intensity."),
    negative: str = _OPTS["negative"], steps: int | None = _OPTS["steps"],
    sampler: str | None = _OPTS["sampler"], schedule: Schedule | None = _OPTS["schedule"],
    cfg: float | None = _OPTS["cfg"], seed: int = _OPTS["seed"],
    width: int | None = _OPTS["width"], height: int | None = _OPTS["height"],
    model: str | None = _OPTS["model"], out: Path = _OPTS["out"],
    allow_pickle: bool = _OPTS["allow_pickle"], models_dir: Path | None = _OPTS["models_dir"],
    device: str = _OPTS["device"], offload: str = _OPTS["offload"],
) -> None:
    """Variations of an image (as DALL-E 2's): its embedding, through the IP-Adapter, drawn anew. Each PNG
    records the image prompt, so --from reproduces it."""
    from imagine.adapters.image_prompt import ImagePromptUnit
    from imagine.pipelines.request import input_record, open_image

    try:
        unit = ImagePromptUnit(open_image(image, "image"), scale, model=ip_adapter, type=kind,
                               input=input_record(image)).check()
    except ValueError as err:
        fail(str(err))
    _run("txt2img", model, _settings(prompt, negative, steps, sampler, schedule, cfg, 0.0, seed, n, width, height),
         out, allow_pickle=allow_pickle, models_dir=models_dir, image_prompts=[unit], device=device, offload=offload)


@app.command(rich_help_panel=EDIT)
def img2img(
    image: Path = typer.Argument(..., help="The init image."),
    prompt: str = typer.Argument(..., help="What it should become."),
    strength: float = typer.Option(0.75, help="In (0, 1]: how much of the schedule to run (1 ignores the image)."),
    resize_mode: ResizeMode = _OPTS["resize_mode"],
    negative: str = _OPTS["negative"], steps: int | None = _OPTS["steps"],
    sampler: str | None = _OPTS["sampler"], schedule: Schedule | None = _OPTS["schedule"],
    cfg: float | None = _OPTS["cfg"], rescale: float = _OPTS["rescale"], seed: int = _OPTS["seed"],
    n: int = _OPTS["n"], width: int | None = _OPTS["width"], height: int | None = _OPTS["height"],
    model: str | None = _OPTS["model"], out: Path = _OPTS["out"], vae: str | None = _OPTS["vae"],
    text_encoder: list[str] = _OPTS["text_encoder"],
    backend: Backend = _OPTS["backend"], fast: bool = _OPTS["fast"], tile: int | None = _OPTS["tile"],
    vae_tile: int | None = _OPTS["vae_tile"],
    allow_pickle: bool = _OPTS["allow_pickle"], models_dir: Path | None = _OPTS["models_dir"],
    lora: list[str] = _OPTS["lora"], embedding: list[str] = _OPTS["embedding"],
    lora_strict: str = _OPTS["lora_strict"],  # parsed to a bool
    clip_skip: int | None = _OPTS["clip_skip"], noise_seed_delta: int = _OPTS["noise_seed_delta"],
    distilled_cfg: float = _OPTS["distilled_cfg"], mask_weight: float = _OPTS["mask_weight"],
    image_cfg: float = _OPTS["image_cfg"],
    control: list[str] = _OPTS["control"], adapter: list[str] = _OPTS["adapter"],
    control_mode: str = _OPTS["control_mode"], image_prompt: list[str] = _OPTS["image_prompt"],
    watermark: bool = _OPTS["watermark"], sign_key: Path | None = _OPTS["sign_key"],
    refiner: str | None = _OPTS["refiner"], refiner_switch_at: float = _OPTS["refiner_switch_at"],
    device: str = _OPTS["device"], offload: str = _OPTS["offload"], plan: bool = _OPTS["plan"],
) -> None:
    """Image to image (SDEdit): noise the image to `strength` and denoise toward the prompt. With an instruct
    model (InstructPix2Pix) the prompt is an instruction ("make it blue") and --image-cfg keeps to the image."""
    _run("img2img", _model_option(model, fast), _settings(
        prompt, negative, steps, sampler, schedule, cfg, rescale, seed, n, width, height, strength=strength,
        resize_mode=resize_mode, clip_skip=clip_skip, noise_seed_delta=noise_seed_delta, backend=backend,
        distilled_cfg_scale=distilled_cfg, inpainting_mask_weight=mask_weight, image_cfg_scale=image_cfg,
        tile=tile, vae_tile=vae_tile, watermark=watermark,
        refiner=refiner, refiner_switch_at=refiner_switch_at), out, init=image, sign_key=sign_key, vae=vae,
         text_encoder=text_encoder,
         allow_pickle=allow_pickle, models_dir=models_dir, lora=lora, embedding=embedding, lora_strict=lora_strict,
         controls=_units(control, adapter, control_mode), image_prompts=_prompts(image_prompt),
         device=device, plan=plan, offload=offload)


@app.command(rich_help_panel=EDIT)
def inpaint(
    image: Path = typer.Argument(..., help="The image to edit."),
    mask: Path = typer.Argument(..., help="Same size; white = regenerate, black = keep."),
    prompt: str = typer.Argument(..., help="What to draw in the masked region."),
    strength: float = typer.Option(1.0, help="In (0, 1]: 1 regenerates the masked region from scratch."),
    mask_blur: int = typer.Option(4, help="Gaussian blur radius of the mask, in pixels."),
    masked_content: InpaintFill = typer.Option(InpaintFill.latent_noise, help="What the masked region starts "
                                               "from: its surroundings' colours (fill), the original, latent noise "
                                               "or nothing (A1111's Masked content). Latent noise draws the asked "
                                               "object most often (docs/benchmarks/inpaint_eval.md); original "
                                               "keeps the region's composition for touch-ups."),
    only_masked: bool = typer.Option(False, "--only-masked", help="Inpaint the mask's box at the full output "
                                     "size and paste it back (A1111's Inpaint area: Only masked)."),
    only_masked_padding: int = typer.Option(32, help="Pixels around the mask's box, with --only-masked."),
    invert_mask: bool = typer.Option(False, "--invert-mask", help="Regenerate where the mask is black."),
    left: int = _OPTS["left"], right: int = _OPTS["right"], up: int = _OPTS["up"], down: int = _OPTS["down"],
    resize_mode: ResizeMode = _OPTS["resize_mode"],
    negative: str = _OPTS["negative"], steps: int | None = _OPTS["steps"],
    sampler: str | None = _OPTS["sampler"], schedule: Schedule | None = _OPTS["schedule"],
    cfg: float | None = _OPTS["cfg"], rescale: float = _OPTS["rescale"], seed: int = _OPTS["seed"],
    n: int = _OPTS["n"], width: int | None = _OPTS["width"], height: int | None = _OPTS["height"],
    model: str | None = _OPTS["model"], out: Path = _OPTS["out"], vae: str | None = _OPTS["vae"],
    text_encoder: list[str] = _OPTS["text_encoder"],
    backend: Backend = _OPTS["backend"], fast: bool = _OPTS["fast"], tile: int | None = _OPTS["tile"],
    vae_tile: int | None = _OPTS["vae_tile"],
    allow_pickle: bool = _OPTS["allow_pickle"], models_dir: Path | None = _OPTS["models_dir"],
    lora: list[str] = _OPTS["lora"], embedding: list[str] = _OPTS["embedding"],
    lora_strict: str = _OPTS["lora_strict"],  # parsed to a bool
    clip_skip: int | None = _OPTS["clip_skip"], noise_seed_delta: int = _OPTS["noise_seed_delta"],
    distilled_cfg: float = _OPTS["distilled_cfg"], mask_weight: float = _OPTS["mask_weight"],
    control: list[str] = _OPTS["control"], adapter: list[str] = _OPTS["adapter"],
    control_mode: str = _OPTS["control_mode"], image_prompt: list[str] = _OPTS["image_prompt"],
    watermark: bool = _OPTS["watermark"], sign_key: Path | None = _OPTS["sign_key"],
    refiner: str | None = _OPTS["refiner"], refiner_switch_at: float = _OPTS["refiner_switch_at"],
    device: str = _OPTS["device"], offload: str = _OPTS["offload"], plan: bool = _OPTS["plan"],
) -> None:
    """Inpainting: regenerate the masked region, keep the rest (a plain model by blending its latents, an
    inpainting checkpoint through its own mask and masked-image input)."""
    _run("inpaint", _model_option(model, fast), _settings(
        prompt, negative, steps, sampler, schedule, cfg, rescale, seed, n, width, height, strength=strength,
        mask_blur=mask_blur, inpaint_fill=masked_content, inpaint_only_masked=only_masked,
        inpaint_padding=only_masked_padding, mask_invert=invert_mask, resize_mode=resize_mode, clip_skip=clip_skip,
        distilled_cfg_scale=distilled_cfg, inpainting_mask_weight=mask_weight, outpaint_left=left,
        outpaint_right=right, outpaint_up=up, outpaint_down=down,
        noise_seed_delta=noise_seed_delta, backend=backend, tile=tile, vae_tile=vae_tile, watermark=watermark,
        refiner=refiner, refiner_switch_at=refiner_switch_at), out, init=image,
         sign_key=sign_key, mask=mask, vae=vae,
         text_encoder=text_encoder, allow_pickle=allow_pickle, models_dir=models_dir, lora=lora, embedding=embedding,
         lora_strict=lora_strict,
         controls=_units(control, adapter, control_mode), image_prompts=_prompts(image_prompt),
         device=device, plan=plan, offload=offload)


@app.command(rich_help_panel=EDIT)
def outpaint(
    image: Path = typer.Argument(..., help="The image to extend."),
    prompt: str = typer.Argument(..., help="What the whole, larger picture shows."),
    left: int = _OPTS["left"], right: int = _OPTS["right"], up: int = _OPTS["up"], down: int = _OPTS["down"],
    mask: Path | None = typer.Option(None, "--mask", help="Also regenerate where this mask (the image's size) is "
                                                          "white, as inpaint does."),
    strength: float = typer.Option(1.0, help="In (0, 1]: 1 draws the new border from scratch."),
    mask_blur: int = typer.Option(4, help="Gaussian blur radius of the seam, in pixels (the mask reaches twice "
                                          "this into the image)."),
    masked_content: InpaintFill = typer.Option(InpaintFill.fill, help="What the new border starts from: the "
                                               "colours around it (fill, the default here as in A1111's "
                                               "outpainting), latent noise or nothing; original is the same as "
                                               "fill outside the image."),
    resize_mode: ResizeMode = _OPTS["resize_mode"],
    negative: str = _OPTS["negative"], steps: int | None = _OPTS["steps"],
    sampler: str | None = _OPTS["sampler"], schedule: Schedule | None = _OPTS["schedule"],
    cfg: float | None = _OPTS["cfg"], rescale: float = _OPTS["rescale"], seed: int = _OPTS["seed"],
    n: int = _OPTS["n"], width: int | None = _OPTS["width"], height: int | None = _OPTS["height"],
    model: str | None = _OPTS["model"], out: Path = _OPTS["out"], vae: str | None = _OPTS["vae"],
    text_encoder: list[str] = _OPTS["text_encoder"],
    backend: Backend = _OPTS["backend"], fast: bool = _OPTS["fast"], tile: int | None = _OPTS["tile"],
    vae_tile: int | None = _OPTS["vae_tile"],
    allow_pickle: bool = _OPTS["allow_pickle"], models_dir: Path | None = _OPTS["models_dir"],
    lora: list[str] = _OPTS["lora"], embedding: list[str] = _OPTS["embedding"],
    lora_strict: str = _OPTS["lora_strict"],  # parsed to a bool
    clip_skip: int | None = _OPTS["clip_skip"], noise_seed_delta: int = _OPTS["noise_seed_delta"],
    distilled_cfg: float = _OPTS["distilled_cfg"], mask_weight: float = _OPTS["mask_weight"],
    control: list[str] = _OPTS["control"], adapter: list[str] = _OPTS["adapter"],
    control_mode: str = _OPTS["control_mode"], image_prompt: list[str] = _OPTS["image_prompt"],
    watermark: bool = _OPTS["watermark"], sign_key: Path | None = _OPTS["sign_key"],
    refiner: str | None = _OPTS["refiner"], refiner_switch_at: float = _OPTS["refiner_switch_at"],
    device: str = _OPTS["device"], offload: str = _OPTS["offload"], plan: bool = _OPTS["plan"],
) -> None:
    """Outpainting: grow the canvas by the borders given and draw them to continue the image (a plain model
    or an inpainting checkpoint), blending the seam; the image's own pixels are kept. The PNG records the
    borders, so --from redoes it."""
    if not any((left, right, up, down)):
        fail("give at least one border to add: --left, --right, --up or --down (pixels)")
    _run("inpaint", _model_option(model, fast), _settings(
        prompt, negative, steps, sampler, schedule, cfg, rescale, seed, n, width, height, strength=strength,
        mask_blur=mask_blur, inpaint_fill=masked_content, outpaint_left=left, outpaint_right=right,
        outpaint_up=up, outpaint_down=down, resize_mode=resize_mode, clip_skip=clip_skip,
        distilled_cfg_scale=distilled_cfg, inpainting_mask_weight=mask_weight,
        noise_seed_delta=noise_seed_delta, backend=backend, tile=tile, vae_tile=vae_tile, watermark=watermark,
        refiner=refiner, refiner_switch_at=refiner_switch_at), out, init=image,
         sign_key=sign_key, mask=mask, vae=vae,
         text_encoder=text_encoder, allow_pickle=allow_pickle, models_dir=models_dir, lora=lora, embedding=embedding,
         lora_strict=lora_strict,
         controls=_units(control, adapter, control_mode), image_prompts=_prompts(image_prompt),
         device=device, plan=plan, offload=offload)


def _edit_options(prompt, source, null_text, edit_mask, strength, resize_mode, negative, steps, cfg, rescale, seed,
                  width, height, clip_skip, distilled_cfg=3.5, watermark=False):
    return _settings(prompt, negative, steps, None, None, cfg, rescale, seed, 1, width, height, strength=strength,
                     resize_mode=resize_mode, source_prompt=source, null_text=null_text, edit_mask=edit_mask,
                     clip_skip=clip_skip, distilled_cfg_scale=distilled_cfg, watermark=watermark)


_EDIT = dict(
    null_text=typer.Option(False, "--null-text", help="Null-text inversion (Mokady et al. 2022): optimise the "
                                                      "unconditional text at each step so the image comes back "
                                                      "under guidance; about 10x slower than plain DDIM inversion."),
    strength=typer.Option(1.0, help="In (0, 1]: how far up the schedule to invert (1: to pure noise)."),
    steps=typer.Option(None, help="DDIM steps (default: the model's); 50 reconstructs closer than 25."),
    inversion=typer.Option(None, "--inversion", help="An inversion written by imagine invert --save for this "
                                                     "image, model and settings: skips inverting again."),
)


@app.command(rich_help_panel=EDIT)
def edit(
    image: Path = typer.Argument(..., help="The image to edit."),
    from_prompt: str = typer.Option("", "--from-prompt", help="What the image shows (it is inverted under it; "
                                                              "empty: inverted without text)."),
    to_prompt: str = typer.Option(..., "--to-prompt", help="What it should show instead."),
    null_text: bool = _EDIT["null_text"],
    edit_mask: bool = typer.Option(True, "--edit-mask/--no-edit-mask", help="Change only where the two prompts' "
                                   "predictions differ (DiffEdit's mask) and keep the rest of the image's pixels."),
    strength: float = _EDIT["strength"], resize_mode: ResizeMode = _OPTS["resize_mode"],
    negative: str = _OPTS["negative"], steps: int | None = _EDIT["steps"],
    cfg: float | None = _OPTS["cfg"], rescale: float = _OPTS["rescale"], seed: int = _OPTS["seed"],
    width: int | None = _OPTS["width"], height: int | None = _OPTS["height"],
    model: str | None = _OPTS["model"], out: Path = _OPTS["out"], vae: str | None = _OPTS["vae"],
    text_encoder: list[str] = _OPTS["text_encoder"],
    allow_pickle: bool = _OPTS["allow_pickle"], models_dir: Path | None = _OPTS["models_dir"],
    lora: list[str] = _OPTS["lora"], embedding: list[str] = _OPTS["embedding"],
    lora_strict: str = _OPTS["lora_strict"],  # parsed to a bool
    clip_skip: int | None = _OPTS["clip_skip"], distilled_cfg: float = _OPTS["distilled_cfg"],
    inversion: Path | None = _EDIT["inversion"],
    watermark: bool = _OPTS["watermark"], sign_key: Path | None = _OPTS["sign_key"],
    device: str = _OPTS["device"], offload: str = _OPTS["offload"], plan: bool = _OPTS["plan"],
) -> None:
    """Edit a real image by inversion: DDIM run backwards under --from-prompt finds its noise, and sampling from
    it under --to-prompt edits it ("a red circle" -> "a blue circle"); DiffEdit's mask keeps the rest. The seed
    only draws the mask's noise."""
    settings = _edit_options(to_prompt, from_prompt, null_text, edit_mask, strength, resize_mode, negative, steps,
                             cfg, rescale, seed, width, height, clip_skip, distilled_cfg, watermark)
    _run("edit", model, settings, out, init=image, vae=vae, sign_key=sign_key,
         text_encoder=text_encoder, allow_pickle=allow_pickle, models_dir=models_dir, lora=lora, embedding=embedding,
         lora_strict=lora_strict, inversion_file=inversion, device=device, plan=plan, offload=offload)


@app.command(rich_help_panel=EDIT)
def invert(
    image: Path = typer.Argument(..., help="The image to invert."),
    prompt: str = typer.Option("", "--prompt", help="What the image shows."),
    null_text: bool = _EDIT["null_text"], strength: float = _EDIT["strength"],
    resize_mode: ResizeMode = _OPTS["resize_mode"],
    negative: str = _OPTS["negative"], steps: int | None = _EDIT["steps"],
    cfg: float | None = _OPTS["cfg"], width: int | None = _OPTS["width"], height: int | None = _OPTS["height"],
    model: str | None = _OPTS["model"], out: Path = _OPTS["out"], vae: str | None = _OPTS["vae"],
    text_encoder: list[str] = _OPTS["text_encoder"],
    allow_pickle: bool = _OPTS["allow_pickle"], models_dir: Path | None = _OPTS["models_dir"],
    lora: list[str] = _OPTS["lora"], embedding: list[str] = _OPTS["embedding"],
    clip_skip: int | None = _OPTS["clip_skip"],
    save_to: Path | None = typer.Option(None, "--save", help="Write the inversion (its latents and null-text "
                                                            "states, .safetensors) for imagine edit --inversion."),
    watermark: bool = _OPTS["watermark"], sign_key: Path | None = _OPTS["sign_key"],
    device: str = _OPTS["device"], offload: str = _OPTS["offload"],
) -> None:
    """DDIM inversion: find the noise that makes IMAGE under --prompt, and show how well it comes back (the
    reconstruction is written as a PNG and its PSNR against the image printed). --null-text makes it come back
    under guidance; --save keeps it for edits."""
    import numpy as np
    from PIL import Image

    from imagine.data.transforms import fit_image

    settings = _edit_options(prompt, prompt, null_text, False, strength, resize_mode, negative, steps, cfg, 0.0, 0,
                             width, height, clip_skip, watermark=watermark)
    paths = _run("edit", model, settings, out, init=image, vae=vae, text_encoder=text_encoder, sign_key=sign_key,
                 allow_pickle=allow_pickle, models_dir=models_dir, lora=lora, embedding=embedding,
                 save_inversion=save_to, device=device)
    made = Image.open(paths[0]).convert("RGB")
    source = fit_image(Image.open(image).convert("RGB"), made.size, resize_mode.value)
    error = np.mean((np.asarray(made, np.float64) - np.asarray(source, np.float64)) ** 2)
    psnr = 10 * np.log10(255**2 / max(error, 1e-10))
    typer.echo(f"reconstruction PSNR: {psnr:.2f} dB", err=True)


@app.command(rich_help_panel=GENERATE)
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
    """Generate images from a trained class-conditional or unconditional model: image i from seed S + i."""
    from imagine.io.checkpoint import CheckpointError
    from imagine.io.model_folder import load_model_folder
    from imagine.pipelines.output import save
    from imagine.pipelines.unconditional import sample_images

    try:
        if n < 1:
            raise ValueError(f"--n must be >= 1, got {n}")
        loaded = load_model_folder(model)
        for start in range(0, n, batch_size):
            seeds = list(range(seed + start, seed + min(n, start + batch_size)))
            for path in save(sample_images(loaded, seeds, steps, sampler, class_label, cfg), out):
                typer.echo(str(path))
    except (ValueError, CheckpointError) as err:
        fail(str(err))


@app.command(rich_help_panel=GENERATE)
def info(image: Path = typer.Argument(..., help="A PNG made by imagine or AUTOMATIC1111."),
         verify: bool = typer.Option(False, "--verify", help="Check the record's signature (exit 1 when it is "
                                                             "missing or does not hold)."),
         public_key: Path | None = typer.Option(None, "--public-key", help="With --verify: the Ed25519 public key "
                                                                          "(PEM) the image must be signed by.")
         ) -> None:
    """Print an image's generation parameters (A1111's text, parsed) and imagine's full JSON record; whether it
    carries the invisible watermark; with --verify, whether its signed record still holds."""
    import numpy as np
    from PIL import Image

    from imagine.a1111 import parse_a1111
    from imagine.io import provenance
    from imagine.io.png import read_png_metadata

    try:
        parameters, record = read_png_metadata(image)
        with Image.open(image) as img:
            pixels = np.asarray(img)
        trusted = provenance.load_public_key(public_key) if public_key is not None else None
    except ValueError as err:
        fail(str(err))
    if parameters is None and record is None and not verify:
        typer.echo(f"{image} carries no generation parameters", err=True)
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
    typer.echo("")
    typer.echo(f"invisible watermark: {provenance.describe_watermark(pixels)}")
    if verify or (record or {}).get("signature"):
        valid, said = provenance.verify(pixels, parameters, record, trusted)
        typer.echo(f"signature: {said}")
        if verify and not valid:
            raise typer.Exit(1)
    elif parameters is None and record is None:
        raise typer.Exit(1)


@app.command(rich_help_panel=GENERATE)
def keygen(path: Path = typer.Argument(..., help="Where to write the private key (PEM); the public key goes "
                                                 "beside it as NAME.pub.pem.")) -> None:
    """Make an Ed25519 key pair for --sign-key (images' records signed) and imagine info --verify --public-key."""
    from imagine.io.provenance import fingerprint, load_signing_key, write_keypair

    try:
        private, public = write_keypair(path)
    except ValueError as err:
        fail(str(err))
    typer.echo(f"private key: {private} (keep it; readable by you only)")
    typer.echo(f"public key: {public} (key id {fingerprint(load_signing_key(private).public_key())}: give it to "
               "those who check your images)")
