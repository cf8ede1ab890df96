"""Making images larger: super-resolution stages (Imagen's, diffusion/superres.py) run in a cascade after a base
model, A1111's hires fix, Extras' upscaling of any picture, and plain resamplers (Lanczos and friends) as
A1111's upscaler list has them.

An SR stage is a text-conditioned pixel diffusion model whose input also carries the low-resolution image,
upsampled and noise-augmented at a chosen level. Each image of a batch takes its sampling noise from its own
seed and its augmentation noise from the seed's own second stream, so image i is the same at any batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagine.a1111 import a1111_parameters
from imagine.adapters.control import ControlUnit, control_models, find_control, resolve_units
from imagine.devices import module_device, resolve_device
from imagine.diffusion.superres import augment, check_noise_level, upsample
from imagine.io import models_dir as md
from imagine.io.model_folder import DiffusionModel, load_model_folder, sr_stage_folders
from imagine.io.png import environment, file_hash
from imagine.models.text_encoders import load_text_encoder
from imagine.pipelines.generate import _sample, img2img, output_size
from imagine.pipelines.output import Generated
from imagine.pipelines.settings import Settings
from imagine.pipelines.unconditional import to_uint8
from imagine.weights import SR_MODEL, sr_model

# The augmentation noise of the image with seed s comes from the generator seeded s + AUG_SEED: a stream of
# its own, apart from the sampler's (seed s) and from the seeds of the images beside it.
AUG_SEED = 0x5EED_0A06
# Resamplers by the names A1111 lists them under (/sdapi/v1/upscalers)
RESAMPLERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST, "Bicubic": Image.BICUBIC,
              "Bilinear": Image.BILINEAR}


def is_sr_stage(model: DiffusionModel) -> bool:
    return model.spec.upscale > 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a.squeeze()) for a in to_uint8(images)]


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """RGB pictures of one size -> (N, 3, H, W) in [-1, 1]."""
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images of one batch must share a size, got {sorted(sizes)}")
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1 for im in images]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def resample(images: list[Image.Image], size: tuple[int, int], name: str = "Lanczos") -> list[Image.Image]:
    """Each picture resized to ``size`` (width, height) by a named resampler."""
    if name not in RESAMPLERS:
        raise ValueError(f"resampler {name!r} unknown; choose one of: {', '.join(RESAMPLERS)}")
    return [im.convert("RGB").resize(size, RESAMPLERS[name]) if im.size != size else im.convert("RGB")
            for im in images]


def sr_stage(model: DiffusionModel, images: torch.Tensor, s, text_encoder, noise_level: int | None = None,
             **kwargs) -> torch.Tensor:
    """One super-resolution stage: ``images`` (n, 3, h, w) in [-1, 1], image i with seed s.seed + i, made
    ``model.spec.upscale`` times larger under the settings ``s`` (prompt, steps, sampler, CFG). noise_level:
    the augmentation level (None: the stage's default)."""
    spec = model.spec
    if not is_sr_stage(model):
        raise ValueError(f"{model.name} is not a super-resolution stage (it has no upscale factor)")
    n, channels, h, w = images.shape
    if channels != spec.image_channels:
        raise ValueError(f"the stage takes {spec.image_channels}-channel images, got {channels}")
    if n != s.n:
        raise ValueError(f"{n} images for {s.n} seeds")
    level = spec.default_noise_level if noise_level is None else noise_level
    if spec.noise_levels:
        check_noise_level(level, spec.noise_levels)
    elif level:
        raise ValueError("this stage was trained without noise augmentation: its noise level is 0")
    size = (h * spec.upscale, w * spec.upscale)
    noise = torch.stack([torch.randn((channels, *size), generator=torch.Generator().manual_seed(s.seed + i + AUG_SEED))
                         for i in range(n)])
    levels = torch.full((n,), int(level), dtype=torch.long)
    rows = augment(upsample(images.float(), size), levels, noise, spec.alphas_cumprod().float())
    stage = replace(s, width=size[1], height=size[0]).validate()
    return _sample(model, stage, text_encoder, low_res=(rows, levels), **kwargs)


def stage_settings(model: DiffusionModel, s, steps: int | None = None, sampler: str | None = None,
                   cfg_scale: float | None = None):
    """The settings a stage runs with: the request's prompt, seed and count, the stage's own defaults (its
    diffusion.json) for steps, sampler and guidance unless given, and none of the base's size or image options."""
    base = Settings(prompt=s.prompt, negative_prompt=s.negative_prompt, seed=s.seed, n=s.n, precision=s.precision,
                    noise_seed_delta=s.noise_seed_delta, tile=s.tile)
    return base.with_model_defaults(model.spec, steps, sampler, cfg_scale)


LATENT = "Latent"  # A1111's latent upscaler: the second pass starts from the first's latent, resized
TILE = "Tile ControlNet"  # hires fix's second pass steered by a tile ControlNet on the Lanczos-upscaled image
_STAGES: dict[tuple, list[DiffusionModel]] = {}  # loaded SR stages by (path, mtime): a server reuses them


@dataclass(frozen=True)
class Upscaler:
    """A named way to make images larger: a resampler, Latent (hires fix only), or SR stages run in order."""

    name: str
    kind: str  # "resample", "latent" or "sr"
    stages: tuple = ()  # the SR stages (DiffusionModels)
    path: Path | None = None

    def to(self, device) -> Upscaler:
        """Its SR stages' networks on ``device`` (a resampler has none); itself."""
        for stage in self.stages:
            stage.unet.to(device)
            if stage.vae is not None:
                stage.vae.to(device)
        return self

    def record(self) -> dict:
        out = {"name": self.name, "kind": self.kind}
        if self.kind == "tile":
            weights = self.path if self.path.is_file() else self.path / "diffusion_pytorch_model.safetensors"
            out.update(path=str(self.path.resolve()), sha256_10=file_hash(weights) if weights.is_file() else None)
        if self.kind == "sr":
            out["path"] = str(self.path.resolve())
            out["stages"] = [{"name": m.name, "upscale": m.spec.upscale, "unet_sha256_10": file_hash(m.weights_file)}
                             for m in self.stages]
        return out


def load_stages(path: Path) -> list[DiffusionModel]:
    """The SR stages at ``path``, loaded once per process (and again when the files change)."""
    folders = sr_stage_folders(path)
    key = tuple((str(f.resolve()), (f / "diffusion.json").stat().st_mtime_ns) for f in folders)
    if key not in _STAGES:
        stages = []
        for folder in folders:
            model = load_model_folder(folder)
            if not is_sr_stage(model):
                raise ValueError(f"{folder} is not a super-resolution stage (its diffusion.json has no upscale "
                                 "factor): train one with imagine train-sr")
            model.unet.eval()
            stages.append(model)
        if len(_STAGES) >= 4:
            _STAGES.pop(next(iter(_STAGES)))
        _STAGES[key] = stages
    return _STAGES[key]


def resolve_upscaler(name: str, models_dir: Path | None = None, model: DiffusionModel | None = None, *,
                     confined: bool = False) -> Upscaler:
    """An upscaler by name: a resampler (Lanczos, Bicubic, Bilinear, Nearest), Latent, Tile ControlNet[@NAME]
    (hires fix for ``model``: the tile ControlNet that fits it, or the one named), the shipped SR stage (its
    folder name, shapes-sr), an SR stage or cascade in the models folder's SR/, or a path to one."""
    if name in RESAMPLERS:
        return Upscaler(name, "resample")
    if name == LATENT:
        return Upscaler(name, "latent")
    if name.split("@", 1)[0] == TILE:
        if model is None:
            raise ValueError(f"{TILE} steers hires fix's second pass with the base model; upscale a picture with "
                             "a resampler or an SR stage")
        named = name.partition("@")[2]
        try:
            path = (md.resolve(named, models_dir, "controlnet", confined=confined) if named else
                    find_control("tile", "controlnet", models_dir, model.unet))
        except FileNotFoundError as err:
            raise ValueError(f"upscaler {name!r}: {err}") from None
        return Upscaler(name, "tile", path=Path(path))
    if name == SR_MODEL.name:
        path = sr_model()
    else:
        try:
            path = md.resolve(name, models_dir, "sr", confined=confined)
        except FileNotFoundError as err:
            known = ", ".join([*RESAMPLERS, LATENT, TILE, SR_MODEL.name])
            raise ValueError(f"upscaler {name!r} unknown: not one of {known}, and {err}") from None
    stages = load_stages(path)
    return Upscaler(name, "sr", tuple(stages), Path(path))


def upscaler_names(models_dir: Path | None = None) -> list[str]:
    """Every upscaler a request may name (A1111's /sdapi/v1/upscalers): resamplers, the shipped SR stage
    when installed, the models folder's SR/."""
    names = list(RESAMPLERS)
    if _has_tile_controlnet(models_dir):
        names.append(TILE)
    if (SR_MODEL / "diffusion.json").exists():
        names.append(SR_MODEL.name)
    return names + [e.name for e in md.entries(models_dir, "sr")]


def _has_tile_controlnet(models_dir: Path | None) -> bool:
    return any(condition == "tile" for _, _, condition in control_models(models_dir))


def hires_size(model: DiffusionModel, s) -> tuple[int, int]:
    """The second pass's (width, height): the first pass's times the scale, rounded to the latent factor."""
    w, h = output_size(model, s)
    f = model.latent_factor
    return max(f, round(w * s.hires_scale / f) * f), max(f, round(h * s.hires_scale / f) * f)


def enlarge(images: torch.Tensor, size: tuple[int, int], upscaler: Upscaler, s, text_encoder, **kwargs
            ) -> torch.Tensor:
    """(n, 3, h, w) in [-1, 1] -> (n, 3, H, W) for ``size`` = (W, H): resampled, or through the SR stages in
    order (the prompt going to each, image i with seed s.seed + i) until they reach the size (the last stage
    again where the stages fall short, as A1111 repeats an upscaler's passes), then resampled to it exactly
    (Lanczos) where they overshoot or the aspect differs."""
    if upscaler.kind in ("latent", "tile"):
        raise ValueError(f"the {upscaler.name} upscaler works inside hires fix only (it needs a second pass)")
    if upscaler.kind == "sr":
        scale = max(size[0] / images.shape[-1], size[1] / images.shape[-2])
        out, reached, i = images, 1, 0
        while reached < scale - 1e-9:
            stage = upscaler.stages[min(i, len(upscaler.stages) - 1)]
            out = sr_stage(stage, out, stage_settings(stage, s), text_encoder, s.sr_noise_level, **kwargs)
            reached, i = reached * stage.spec.upscale, i + 1
        if tuple(out.shape[-2:]) == (size[1], size[0]):
            return out
        images = out
    return from_pil(resample(to_pil(images), size, "Lanczos" if upscaler.kind == "sr" else upscaler.name))


def hires(model: DiffusionModel, s, images: torch.Tensor, text_encoder, upscaler: Upscaler, callback=None,
          cancel=None, **kwargs) -> torch.Tensor:
    """A1111's hires fix on txt2img output: each image upscaled to hires_scale x its size, then (hires_strength
    > 0) img2img with the same model, prompt and seed at that strength for hires_steps (or the first pass's)
    steps. Image i is handled alone with seed s.seed + i, so the batch does not matter."""
    size = hires_size(model, s)
    if upscaler.kind in ("latent", "tile") and s.hires_strength == 0:
        raise ValueError(f"the {upscaler.name} upscaler needs a second pass: give hires strength > 0 (A1111: 0.5 "
                         "or more)")
    if upscaler.kind == "latent":
        inits = to_pil(images)
    else:
        resampler = Upscaler("Lanczos", "resample") if upscaler.kind == "tile" else upscaler
        resampler.to(module_device(model.unet))  # SR stages run beside the model
        up = enlarge(images, size, resampler, s, text_encoder, callback=callback, cancel=cancel)
        if s.hires_strength == 0:
            return up
        inits = to_pil(up)
    out = []
    for i, init in enumerate(inits):
        second = replace(s, seed=s.seed + i, n=1, width=size[0], height=size[1], strength=s.hires_strength,
                         steps=s.hires_steps or s.steps, hires_scale=1.0,
                         resize_mode="latent_upscale" if upscaler.kind == "latent" else "just_resize")
        extra = dict(kwargs)
        if upscaler.kind == "tile":  # the upscaled image steers its own second pass (A1111's tile_resample)
            unit = ControlUnit("tile", init, model=str(upscaler.path))
            extra["attachments"] = [*kwargs.get("attachments", ()), *resolve_units([unit], model, size, None)]
        out.append(img2img(model, second, init, text_encoder, callback=callback, cancel=cancel, **extra))
    return torch.cat(out)


def hires_steps_total(s, upscaler: Upscaler | None) -> int:
    """Sampler steps a hires fix adds per image (for progress bars)."""
    if s.hires_scale <= 1 or upscaler is None:
        return 0
    extra = 0
    if upscaler.kind == "sr":
        extra += sum(stage_settings(m, s).steps for m in upscaler.stages)
    if s.hires_strength > 0:
        extra += max(1, round(s.hires_strength * (s.hires_steps or s.steps)))
    return extra


def upscale_pictures(pictures: list[Image.Image], scale: float, upscaler: Upscaler, s, text_encoder=None,
                     inputs: list[dict | None] | None = None, *, size: tuple[int, int] | None = None,
                     crop: bool = True, second: tuple[Upscaler, float] | None = None, callback=None,
                     cancel=None, device: str | torch.device | None = "cpu") -> list:
    """A1111's Extras upscale: each picture made ``scale`` times larger (rounded to whole pixels), or, with
    ``size`` (W, H), by the factor that covers it and then (``crop``) cropped to it about the centre; ``second``
    (upscaler, visibility) blends a second upscaler's result in, as A1111's "Upscaler 2". Picture i takes seed
    s.seed + i (the SR stages' noise). Returns Generated results (pipelines/request.py) whose PNG keeps the
    picture's own A1111 parameters with the postprocessing fields added and records the settings, the input and
    the upscalers, so `imagine upscale --from` reproduces it."""
    if size is None and (not isinstance(scale, (int, float)) or not 1 <= scale <= 16):
        raise ValueError(f"the upscale factor must lie in [1, 16], got {scale!r}")
    if size is not None and (min(size) < 1 or max(size) > 8192):
        raise ValueError(f"the target size must lie in 1..8192 pixels a side, got {size}")
    chosen = [upscaler] + ([second[0]] if second is not None else [])
    for u in chosen:
        if u.kind == "latent":
            raise ValueError("Latent upscaling belongs to hires fix; upscale a picture with a resampler or an SR stage")
    sr = [u.to(resolve_device(device)) for u in chosen if u.kind == "sr"]  # where their SR stages run
    if sr and text_encoder is None:  # SR stages are text-conditioned: their own encoder (loaded once per process)
        text_encoder = load_text_encoder(sr[0].stages[0].spec.text_encoder)
    if second is not None and not 0 <= second[1] <= 1:
        raise ValueError(f"the second upscaler's visibility must lie in [0, 1], got {second[1]}")
    inputs = inputs or [None] * len(pictures)
    out = []
    for i, (picture, source) in enumerate(zip(pictures, inputs, strict=True)):
        picture = picture.convert("RGB")
        factor = max(size[0] / picture.width, size[1] / picture.height) if size is not None else scale
        if factor > 16:
            raise ValueError(f"{picture.width}x{picture.height} to {size[0]}x{size[1]} is {factor:.1f}x, over 16x")
        big = (max(1, round(picture.width * factor)), max(1, round(picture.height * factor)))
        one = replace(s, seed=s.seed + i, n=1)
        with torch.no_grad():
            image = enlarge(from_pil([picture]), big, upscaler, one, text_encoder, callback=callback, cancel=cancel)
            if second is not None and second[1] > 0:
                other = enlarge(from_pil([picture]), big, second[0], one, text_encoder, callback=callback,
                                cancel=cancel)
                image = torch.lerp(image, other, float(second[1]))
        if size is not None and crop and big != size:
            left, top = (big[0] - size[0]) // 2, (big[1] - size[1]) // 2
            image = image[..., top: top + size[1], left: left + size[0]]
        fields = {"Postprocess upscale by": f"{factor:g}" if size is None else None,
                  "Postprocess upscale to": f"{size[0]}x{size[1]}" if size is not None else None,
                  "Postprocess crop to": f"{size[0]}x{size[1]}" if size is not None and crop else None,
                  "Postprocess upscaler": upscaler.name,
                  "Postprocess upscaler 2": second[0].name if second is not None and second[1] > 0 else None,
                  "Postprocess upscaler 2 visibility": f"{second[1]:g}" if second is not None and second[1] > 0
                  else None}
        if sr:
            fields.update({"Postprocess prompt": s.prompt or None, "Postprocess seed": one.seed,
                           "Postprocess SR noise level": s.sr_noise_level})
        own = picture.info.get("parameters") if isinstance(picture.info.get("parameters"), str) else None
        extra = a1111_parameters("", "", fields).lstrip("\n")  # the fields line alone, quoted as A1111 does
        parameters = f"{own.rstrip()}, {extra}" if own else extra
        settings = {**s.to_dict(), "seed": one.seed, "n": 1, "hires_scale": float(scale),
                    "hires_upscaler": upscaler.name, "hires_strength": 0.0}
        record = {"kind": "upscale", "settings": settings, "index": i, "input": source,
                  "upscale": {"size": list(size) if size is not None else None, "crop": crop,
                              "second": [second[0].name, second[1]] if second is not None else None},
                  "upscaler": upscaler.record(), "text_encoder": getattr(text_encoder, "identity", None),
                  "versions": environment()}
        out.append(Generated(to_uint8(image)[0], one.seed, parameters, record, stem=f"{one.seed:06d}-upscale"))
    return out
