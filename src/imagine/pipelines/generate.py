"""txt2img, img2img and inpaint over a trained latent text-to-image model: short explicit loops.

Reproducibility: image i of a request uses its own CPU generator seeded with seed + i for its starting
noise and every noise draw of a stochastic sampler, so it is the same image at any batch size and on any
device. The prompt and negative prompt are encoded in one call, so their windows line up (A1111).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageChops, ImageFilter, ImageOps

from imagine import __version__
from imagine.a1111 import RESIZE_LABELS, a1111_name, a1111_parameters, prompt_loras
from imagine.adapters.attachment import Attachment, by_kind
from imagine.data.transforms import fit_image
from imagine.devices import autocast, module_device, to_device
from imagine.diffusion.denoiser import broadcast_sigma
from imagine.diffusion.model_sampling import model_sampling
from imagine.diffusion.superres import LowResConditioned
from imagine.families import text_width
from imagine.families.aspect_bins import binned_size, resize_and_crop
from imagine.guidance import ClassifierFreeGuidance, ImageTextGuidance
from imagine.io.model_folder import DiffusionModel
from imagine.io.onnx import MANIFEST, default_onnx_folder, export_onnx, load_onnx
from imagine.io.png import environment, file_hash
from imagine.nn import compact
from imagine.nn.embeddings import guidance_embedding
from imagine.pipelines import memory
from imagine.pipelines.settings import Settings
from imagine.pipelines.tiled import TiledDenoiser, tiled_decode
from imagine.samplers import SAMPLERS, check_schedule, resolve


class Cancelled(Exception):
    """Raised between steps when the caller's cancel check says so."""


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_ONNX: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def onnx_runtime(model: DiffusionModel, backend: str, text_encoder=None):
    """ONNX Runtime sessions for ``model`` (io/onnx.py), made once per model, backend and process: from the
    model folder's onnx/ export, else the user cache's, which is exported there on first use (a minute or so;
    ``imagine export-onnx`` makes it ahead of time)."""
    cached = _ONNX.setdefault(model.unet, {})
    if backend not in cached:
        folder = model.path / "onnx" if (model.path / "onnx" / MANIFEST).exists() else default_onnx_folder(model)
        if not (folder / MANIFEST).exists():
            export_onnx(model, text_encoder, folder)
        cached[backend] = load_onnx(folder, model, int8=backend == "onnxruntime-int8")
    return cached[backend]


def _network(unet: torch.nn.Module, compile: bool) -> torch.nn.Module:
    """The UNet, or its torch.compile'd twin: made once per UNet and process and kept, so only the first
    image (and the first of each new shape) pays for compilation."""
    if not compile:
        return unet
    if unet not in _COMPILED:
        _COMPILED[unet] = torch.compile(unet, dynamic=False)
    return _COMPILED[unet]


def available_memory() -> int | None:
    """Bytes this machine can still give (Linux's MemAvailable), or None where it is not known."""
    return memory.available_bytes(torch.device("cpu"))


def weights_dtype(net: torch.nn.Module) -> str:
    """What a denoiser's weights are stored as, for the record: float32, bfloat16, float8_e4m3fn (scaled fp8)
    or "gguf Q8_0" (a GGUF file's block types)."""
    kinds = compact.describe(net)
    if compact.FP8 in kinds:
        return "float8_e4m3fn"
    if kinds:
        return "gguf " + "+".join(sorted(kinds))
    return str(next(p.dtype for p in net.parameters() if p.is_floating_point())).replace("torch.", "")


def check_memory(model: DiffusionModel, width: int, height: int, n: int, tile: int | None = None,
                 available: int | None = None, vae_tile: int | None = None) -> memory.MemoryPlan:
    """Refuse, before anything is allocated, a request whose peak (sampling or decoding, pipelines/memory.py)
    would not fit in the memory its device has free, saying what would fit; the plan, with the VAE tile it
    picked when decoding whole would not fit."""
    if available is None and module_device(model.unet).type == "cpu":
        available = available_memory()
    return memory.check(model, width, height, n, tile, available, vae_tile)


def output_size(model: DiffusionModel, s: Settings) -> tuple[int, int]:
    """(width, height), checked to be multiples of the latent factor."""
    w, h = s.width or model.spec.image_size, s.height or model.spec.image_size
    f = model.latent_factor
    for name, v in (("width", w), ("height", h)):
        if v < f or v % f:
            raise ValueError(f"{name} {v} is not a positive multiple of {f}, this model's latent factor; "
                             f"try {max(f, round(v / f) * f)}")
    return w, h


def _check_text_model(model: DiffusionModel, text_encoder) -> None:
    if model.spec.text_encoder is None:
        raise ValueError("this model is not a text-to-image model; use `imagine sample` for class-conditional "
                         "or unconditional models")
    if text_encoder is None:
        raise ValueError("a text-to-image model needs its text encoder")
    width = text_width(model.unet.config)
    if text_encoder.dim != width:
        raise ValueError(f"text encoder gives {text_encoder.dim}-d states, the network expects {width}-d")


class _TwoRowFloor:
    """Evaluates the network on at least two rows, so that an image's arithmetic is the same whatever batch
    it is in. Measured on CPU kernels (oneDNN convolutions, GEMMs): a row's result is the same at every batch
    size of 2 and more and at every position in the batch, but a batch of one takes other kernels and rounds
    differently in the last bits (the batch-sized GEMMs of the timestep path are computed row by row for the
    same reason, nn/linear.py). Guidance already stacks each image's conditional and unconditional rows; a
    lone row (one image without CFG, an LCM) is evaluated beside a copy of itself. Sits around the network's
    denoiser (inside guidance)."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    @staticmethod
    def _twice(x, sigma, cond):
        return (torch.cat([x, x]), torch.cat([sigma, sigma]),
                {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in (cond or {}).items()} or None)

    def __call__(self, x, sigma, cond=None):
        if len(x) > 1:
            return self.denoiser(x, sigma, cond)
        return self.denoiser(*self._twice(x, broadcast_sigma(sigma, x), cond))[:1]

    def denoise_with_variance(self, x, sigma, cond=None):
        if len(x) > 1:
            return self.denoiser.denoise_with_variance(x, sigma, cond)
        x0, v = self.denoiser.denoise_with_variance(*self._twice(x, broadcast_sigma(sigma, x), cond))
        return x0[:1], v[:1]


def decode(model: DiffusionModel, latent: torch.Tensor, runtime=None, vae_tile: int | None = None) -> torch.Tensor:
    """Latents (N, c, h, w) -> images (N, C, H, W), in one batch of at least two rows (see _TwoRowFloor);
    ``runtime``: ONNX Runtime sessions (onnx_runtime) whose decoder runs instead; ``vae_tile``: decode in
    overlapping tiles of this many pixels a side (VAE tiling, when the whole would not fit)."""
    if model.vae is None:
        return latent.float().cpu()
    device = module_device(model.vae)
    z = model.vae.from_latent(latent.to(device))
    if runtime is not None and runtime.vae is not None:
        return runtime.vae.decode(z)
    # as many rows at a time as memory allows (VAE slicing: a row decodes the same in any batch of two or more);
    # the images come back to the CPU, whatever device decoded them (PNGs, pastes and previews are made there)
    f = model.latent_factor
    rows = memory.decode_rows(model, z.shape[-1] * f, z.shape[-2] * f, len(z), memory.available_bytes(device),
                              vae_tile)
    parts = []
    for start in range(0, len(z), rows):
        part = z[start: start + rows]
        if len(part) == 1:
            part = torch.cat([part, part]) if len(z) == 1 else z[start - 1: start + 1]  # two rows, as the batch
        pixels = tiled_decode(model.vae.decode, part, max(1, vae_tile // f), f) if vae_tile else \
            model.vae.decode(part)
        parts.append(pixels[-min(len(part), len(z) - start):].float().cpu())
    return torch.cat(parts)[: len(z)]


class _InpaintBlend:
    """Keeps the unmasked region on the init latent: the denoiser's x0 estimate there is replaced by it
    at every step, so the sampler converges to it, and the masked region is free."""

    def __init__(self, denoiser, init_latent: torch.Tensor, mask: torch.Tensor):
        self.denoiser, self.init, self.mask = denoiser, init_latent, mask

    def __call__(self, x, sigma, cond=None):
        x0 = self.denoiser(x, sigma, cond)
        return self.mask * x0 + (1 - self.mask) * self.init


@dataclass
class Refining:
    """A1111's refiner (diffusers' denoising_end / denoising_start): ``model`` takes every step whose network
    timestep lies below (1 - switch_at) of the training schedule, with its own text inputs on each branch."""

    model: DiffusionModel
    cond: dict
    uncond: dict | None
    cfg_scale: float
    guidance_rescale: float
    switch_at: float

    def switch(self, base, base_model: DiffusionModel, plan, sigmas: torch.Tensor, num_train_timesteps: int):
        """``base`` (the guided denoiser) down to the switch, the refiner's below it."""
        own = model_sampling(self.model.spec)
        if type(own) is not type(plan) or (hasattr(plan, "alphas_cumprod") and not torch.allclose(
                own.alphas_cumprod, plan.alphas_cumprod)):
            raise ValueError(f"the refiner {self.model.name} was trained on another noise schedule than "
                             f"{base_model.name}: it cannot take over its steps")
        cutoff = round(num_train_timesteps * (1 - self.switch_at))  # diffusers' discrete timestep cutoff
        levels = [float(s) for s, t in zip(sigmas[:-1], plan.timesteps(sigmas[:-1]), strict=True) if float(t) < cutoff]
        if not levels:
            return base  # no step lies below the switch: the base model runs them all, as diffusers does
        refiner = _TwoRowFloor(own.denoiser(_network(self.model.unet, False)))
        device = module_device(self.model.unet)
        if self.uncond is not None:
            refiner = ClassifierFreeGuidance(refiner, to_device(self.uncond, device), self.cfg_scale,
                                             self.guidance_rescale)
        return _Switch(base, refiner, max(levels), to_device(self.cond, device))


class _Switch:
    """The base model's denoiser above ``level``, the refiner's (with its own conditioning) at and below it."""

    def __init__(self, base, refiner, level: float, cond: dict):
        self.base, self.refiner, self.level, self.cond = base, refiner, level, cond

    def __call__(self, x, sigma, cond=None):
        if float(torch.as_tensor(sigma).max()) <= self.level * (1 + 1e-6):
            rows = len(x)
            return self.refiner(x, sigma, {k: _rows(v, rows) for k, v in self.cond.items()})
        return self.base(x, sigma, cond)


def _rows(v, n: int):
    return v.expand(n, *v.shape[1:]) if isinstance(v, torch.Tensor) and len(v) != n else v


def sample(model: DiffusionModel, seeds: list[int], *, steps: int, sampler: str, schedule: str | None,
           cond: dict | None, uncond: dict | None, cfg_scale: float, guidance_rescale: float = 0.0,
           latent_hw: tuple[int, int] | None = None, init_latent: torch.Tensor | None = None,
           strength: float = 1.0, mask: torch.Tensor | None = None, callback: Callable[[dict], None] | None = None,
           cancel: Callable[[], bool] | None = None, precision: str = "fp32", backend: str = "torch",
           compile: bool = False, noise_seed_delta: int = 0, attachments: Sequence[Attachment] = (),
           tile: int | None = None, resize_to: tuple[int, int] | None = None, image_cond: dict | None = None,
           image_cfg_scale: float = 1.0, refiner: Refining | None = None,
           vae_tile: int | None = None) -> torch.Tensor:
    """The one sampling loop of every pipeline: one image per seed, (N, C, H, W) in [-1, 1].

    cond / uncond: the UNet's conditioning kwargs (text states or class labels), uncond for guidance.
    init_latent: start from it noised to ``strength`` of the schedule (img2img); with ``mask`` (latent
    resolution, 1 = regenerate) the unmasked latent is blended in at every step (inpaint).
    noise_seed_delta: as A1111's eta noise seed delta, a stochastic sampler's own noise comes from
    seed + delta while the starting noise stays seed's.
    attachments: what acts on the network at each step (adapters/: ControlNets, T2I-Adapters, image prompts),
    any number and kind; cond and uncond carry their per-row inputs (Attachment.inputs).
    tile: evaluate the network on overlapping tiles of this many latent (or pixel) positions a side.
    refiner: a second model that takes the steps below its switch level (A1111's Refiner).
    vae_tile: decode in overlapping tiles of this many pixels a side (tiled.tiled_decode)."""
    name, implied = resolve(sampler)
    schedule = check_schedule(schedule) if schedule is not None else implied
    spec, f = model.spec, model.latent_factor
    h, w = latent_hw or (spec.image_size // f, spec.image_size // f)
    plan = model_sampling(spec, (h, w))  # its noise levels, denoiser and prior, by its parametrization
    info = SAMPLERS[name]
    if info.timesteps is not None and schedule == "karras":  # LCM: its own timesteps, of its distillation grid
        raise ValueError(f"the {name} sampler walks its own timesteps; leave the schedule at default")
    sigmas = plan.sigmas(steps, karras=schedule == "karras", own=info.timesteps)
    if init_latent is not None:  # SDEdit: run the last strength * steps steps from the noised init
        run = max(1, round(strength * steps))
        sigmas = sigmas[steps - run:]
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    channels = model.vae.config.latent_channels if model.vae is not None else spec.image_channels
    device = module_device(model.unet)  # the noise is the CPU generators' on every device, then moved there
    noise = torch.stack([torch.randn((channels, h, w), generator=g) for g in generators]).to(device)
    init_latent, mask = to_device(init_latent, device), to_device(mask, device)
    cond, uncond, image_cond = to_device(cond, device), to_device(uncond, device), to_device(image_cond, device)
    if noise_seed_delta:
        generators = [torch.Generator().manual_seed(int(seed) + noise_seed_delta) for seed in seeds]
    x = plan.prior(noise, sigmas[0]) if init_latent is None else plan.noised(init_latent, noise, sigmas[0])
    groups = by_kind(attachments)
    stepwise = [kind for kind in groups if kind.per_step]
    runtime = None
    if backend != "torch":
        if stepwise:
            raise ValueError(f"the {backend} backend runs the UNet alone: "
                             f"{', '.join(k.kind.replace('_', '-') for k in stepwise)} units need --backend torch")
        runtime = onnx_runtime(model, backend)
        network = runtime.unet
    else:
        network = _network(model.unet, compile)
    if stepwise:  # each acts on its share of the steps, found from each call's timestep
        timesteps = plan.timesteps(sigmas[:-1])
        for unit in (u for kind in stepwise for u in groups[kind]):  # their networks beside the denoiser's
            network_of = getattr(getattr(unit, "file", None), "model", None)
            if isinstance(network_of, torch.nn.Module):
                network_of.to(device)
        for kind in stepwise:
            network = kind.around(groups[kind], network, model, timesteps)
    if spec.upscale > 1:  # a super-resolution stage: cond carries the low-resolution rows
        if runtime is not None:
            raise ValueError(f"super-resolution stages run on --backend torch, not {backend}")
        network = LowResConditioned(network)
    denoiser = _TwoRowFloor(plan.denoiser(network, consistency=info.consistency, quantize=info.timesteps is not None))
    if tile:
        if any(kind.whole_image for kind in groups):
            raise ValueError("tiled sampling does not take ControlNet or T2I-Adapter units (their maps cover the "
                             "whole image); leave tile unset with them")
        denoiser = TiledDenoiser(denoiser, tile, tile // 4)
    if image_cond is not None:  # InstructPix2Pix: the image's own guidance beside the text's
        denoiser = ImageTextGuidance(denoiser, image_cond, uncond, cfg_scale, image_cfg_scale)
    elif uncond is not None:
        denoiser = ClassifierFreeGuidance(denoiser, uncond, cfg_scale, guidance_rescale)
    elif cfg_scale != 1.0:
        raise ValueError("classifier-free guidance needs an unconditional branch, which this model lacks: use cfg 1")
    if refiner is not None:
        denoiser = refiner.switch(denoiser, model, plan, sigmas, spec.num_train_timesteps)
    if mask is not None:
        denoiser = _InpaintBlend(denoiser, init_latent, mask)

    def report(info: dict) -> None:
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled at step {info['i'] + 1} of {info['total']}")
        if callback is not None:
            callback(info)

    options = {"variance": "learned"} if name == "ddpm" and spec.learned_variance else {}
    with torch.no_grad(), autocast(x.device, precision == "bf16"):
        latent = info.fn(denoiser, x, sigmas, cond=cond, generator=generators, callback=report, signal=plan.signal,
                         **options)
    with torch.no_grad():
        images = decode(model, latent.float(), runtime, vae_tile)
    if resize_to is not None:  # PixArt's buckets: to the size asked, before the clamp (as its pipelines do)
        images = resize_and_crop(images, *resize_to)
    return images.clamp(-1, 1)


def _sample(model: DiffusionModel, s: Settings, text_encoder, *, init_latent: torch.Tensor | None = None,
            mask: torch.Tensor | None = None, callback: Callable[[dict], None] | None = None,
            cancel: Callable[[], bool] | None = None, attachments: Sequence[Attachment] = (),
            low_res: tuple[torch.Tensor, torch.Tensor] | None = None,
            concat: torch.Tensor | None = None, refiner: tuple | None = None) -> torch.Tensor:
    """Text-conditioned sampling: prompt and negative prompt encoded in one call, so their windows line up.
    low_res: a super-resolution stage's (augmented low-resolution rows at the output size, their levels).
    concat: an inpainting UNet's mask and masked-image latents (inpainting_conditioning), on both branches."""
    _check_text_model(model, text_encoder)
    if (low_res is None) != (model.spec.upscale == 1):
        raise ValueError("a super-resolution stage upscales an image: use imagine upscale (or a cascade) with it"
                         if low_res is None else "low-resolution input given to a model that is not an SR stage")
    w, h = output_size(model, s)
    f = model.latent_factor
    out_size = (w, h)
    binned = sampling_size(model, s, w, h) if init_latent is None and low_res is None else None
    if binned is not None:  # PixArt's aspect buckets: generated there, then resized and cropped to the size asked
        w, h = binned

    cond, uncond, image_cond, cfg_scale = branches(model, s, text_encoder, (w, h), attachments=attachments,
                                                   concat=concat, low_res=low_res)
    refining = None
    if refiner is not None:  # (model, text encoder): its own text inputs for the same prompts and size
        r_model, r_encoder = refiner
        check_refiner(model, r_model)
        r_cond, r_uncond, _, r_cfg = branches(r_model, s, r_encoder, (w, h))
        refining = Refining(r_model, r_cond, r_uncond, r_cfg, s.guidance_rescale, s.refiner_switch_at)
    return sample(model, [s.seed + i for i in range(s.n)], steps=s.steps, sampler=s.sampler,
                    schedule=s.schedule, cond=cond, uncond=uncond, cfg_scale=cfg_scale,
                    guidance_rescale=s.guidance_rescale, latent_hw=(h // f, w // f), init_latent=init_latent,
                    strength=s.strength, mask=mask, callback=callback, cancel=cancel, precision=s.precision,
                    backend=s.backend, compile=s.compile, noise_seed_delta=s.noise_seed_delta,
                    attachments=attachments, tile=s.tile // f if s.tile else None,
                    resize_to=out_size if binned is not None else None, image_cond=image_cond,
                    image_cfg_scale=s.image_cfg_scale, refiner=refining, vae_tile=s.vae_tile)


def check_refiner(model: DiffusionModel, refiner: DiffusionModel) -> None:
    """A refiner must work in the base model's latent space, as a plain text-to-image model."""
    if refiner.spec.text_encoder is None:
        raise ValueError(f"the refiner {refiner.name} is not a text-to-image model")
    if refiner.spec.conditioning_channels or refiner.spec.upscale > 1:
        raise ValueError(f"the refiner {refiner.name} is not a plain text-to-image model (an inpainting, instruct, "
                         "super-resolution or flow model cannot take over another model's steps)")
    ours, theirs = model.family.latent, refiner.family.latent
    if ours is None or theirs is None or (ours.channels, ours.scaling_factor, ours.shift_factor) != (
            theirs.channels, theirs.scaling_factor, theirs.shift_factor):
        raise ValueError(f"the refiner {refiner.name} ({refiner.family.label}) works in another latent space than "
                         f"{model.name} ({model.family.label}); an SDXL refiner follows an SDXL model")


def branches(model: DiffusionModel, s: Settings, text_encoder, size: tuple[int, int], *,
             attachments: Sequence[Attachment] = (), concat: torch.Tensor | None = None,
             low_res: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[dict, dict | None, dict | None, float]:
    """The network's inputs on each branch of guidance for a text request at ``size`` (the sampling size):
    (cond, uncond, image_cond, cfg_scale). uncond is None for a model that embeds its guidance (an LCM, whose
    cfg scale is then 1); image_cond is InstructPix2Pix's third branch."""
    w, h = size
    # A1111's <lora:NAME:WEIGHT> tags are taken out of the text (the request attached those LoRAs)
    prompts = [prompt_loras(s.prompt)[0]] * s.n + [prompt_loras(s.negative_prompt)[0]] * s.n
    encoder = text_encoder
    if s.backend != "torch" and s.clip_skip is None and not getattr(text_encoder, "embeddings", None):
        encoder = onnx_runtime(model, s.backend, text_encoder).text_encoder_for(text_encoder)
    text = encoder.encode(prompts) if s.clip_skip is None else encoder.encode(prompts, clip_skip=s.clip_skip)
    cond = {"encoder_hidden_states": text.context[: s.n], "encoder_attention_mask": text.mask[: s.n]}
    uncond = {"encoder_hidden_states": text.context[s.n:], "encoder_attention_mask": text.mask[s.n:]}
    if model.spec.zero_empty_negative and s.negative_prompt == "":  # SDXL (and A1111 for it): zeros, not ""
        uncond["encoder_hidden_states"] = torch.zeros_like(uncond["encoder_hidden_states"])
    family = model.family  # its extra inputs (SDXL: pooled text and size ids; MMDiT: pooled text), both branches
    pooled = text.pooled[: s.n] if text.pooled is not None else None
    cond.update(family.conditioning(pooled, w, h, text.context[: s.n], text.mask[: s.n]))
    pooled = text.pooled[s.n:] if text.pooled is not None else None
    if pooled is not None and model.spec.zero_empty_negative and s.negative_prompt == "":
        pooled = torch.zeros_like(pooled)
    uncond.update(family.conditioning(pooled, w, h, uncond["encoder_hidden_states"], text.mask[s.n:], negative=True))
    if distils_guidance(model):  # Flux [dev]: the distilled guidance scale is an input, on both branches
        cond["guidance"] = uncond["guidance"] = torch.full((s.n,), float(s.distilled_cfg_scale))
    for kind, units in by_kind(attachments).items():  # their per-row inputs on each branch of guidance
        extra_cond, extra_uncond = kind.inputs(units, s.n)
        cond.update(extra_cond)
        uncond.update(extra_uncond)
    image_cond = None
    if model.spec.conditioning_channels == 4:  # InstructPix2Pix: the image to edit, and three branches
        if concat is None:
            raise ValueError("this is an instruct model (InstructPix2Pix): it edits an image, so use img2img with "
                             "the image and an instruction as the prompt")
        cond["concat_latents"] = concat.expand(s.n, -1, -1, -1)
        image_cond = {**uncond, "concat_latents": cond["concat_latents"]}
        uncond["concat_latents"] = torch.zeros_like(cond["concat_latents"])
    elif model.spec.conditioning_channels and concat is None:  # txt2img: a full mask over mid-grey
        concat = inpainting_conditioning(model, s, (w, h))
    if concat is not None and image_cond is None:  # the same mask and masked image on both branches of guidance
        cond["concat_latents"] = concat.expand(s.n, -1, -1, -1)
        if uncond is not None:
            uncond["concat_latents"] = cond["concat_latents"]
    if low_res is not None:  # the same low-resolution rows (and levels) on both branches of guidance
        rows, levels = low_res
        for branch in (cond, uncond):
            branch["low_res"] = rows
            if model.unet.config.num_class_embeds:
                branch["class_labels"] = levels
    cfg_scale = s.cfg_scale
    if embeds_guidance(model):  # an LCM: the guidance scale is an input, one branch per step and no negative
        if s.negative_prompt.strip():
            raise ValueError("this model embeds its guidance scale (a latent consistency model) and has no "
                             "unconditional branch, so a negative prompt cannot act; leave it empty")

        weight = torch.full((s.n,), s.cfg_scale - 1.0)  # LCM's convention: w = cfg scale - 1
        cond["timestep_cond"] = guidance_embedding(weight, model.unet.config.time_cond_proj_dim)
        uncond, cfg_scale = None, 1.0
    return cond, uncond, image_cond, cfg_scale


# the buckets' base side by the transformer's latent sample size, as PixArt's pipelines choose them
BIN_BASES = {32: 256, 64: 512, 128: 1024, 256: 2048}


def sampling_size(model: DiffusionModel, s: Settings, width: int, height: int) -> tuple[int, int] | None:
    """(width, height) a text-to-image request is generated at when it differs from the size asked: the closest
    of the aspect buckets the family trained at (PixArt), with resolution_binning on; None otherwise."""
    if not (s.resolution_binning and model.family.aspect_bins):
        return None
    binned = binned_size(BIN_BASES.get(getattr(model.unet.config, "sample_size", 0), 0), width, height)
    return binned if binned is not None and binned != (width, height) else None


def inpainting_conditioning(model: DiffusionModel, s: Settings, size: tuple[int, int],
                            original: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """An inpainting UNet's extra input (A1111's image conditioning, diffusers' channel order): the mask at the
    latent's size, then the latents of the image with the masked part blanked, blended back toward the whole
    image by 1 - inpainting_mask_weight (A1111's "inpainting conditioning mask strength"). Without a mask the
    whole image is masked (img2img); without an image it is mid-grey (txt2img)."""
    w, h = size
    if original is None:
        original = torch.zeros(1, model.spec.image_channels, h, w)
    if mask is None:
        mask = torch.ones(1, 1, h, w)
    masked = torch.lerp(original, original * (1 - mask), float(s.inpainting_mask_weight))
    latents = _encode(model, masked)
    mask = torch.nn.functional.interpolate(mask, size=latents.shape[-2:]).to(latents.device)
    return torch.cat([mask, latents], dim=1)


def distils_guidance(model: DiffusionModel) -> bool:
    """Whether the denoiser takes a distilled guidance scale as an input (Flux [dev]'s guidance embedding)."""
    return bool(getattr(model.unet.config, "guidance_embeds", False))


def embeds_guidance(model: DiffusionModel) -> bool:
    """Whether the UNet takes its guidance scale as an input (an LCM distilled with w-conditioning)."""
    return getattr(model.unet.config, "time_cond_proj_dim", None) is not None


def txt2img(model: DiffusionModel, s: Settings, text_encoder, **kwargs) -> torch.Tensor:
    """Images from text: (n, C, H, W) in [-1, 1]."""
    return _sample(model, s.validate(), text_encoder, **kwargs)


def _image_tensor(image: Image.Image, size: tuple[int, int], channels: int) -> torch.Tensor:
    """(1, C, H, W) in [-1, 1], resized to ``size`` (width, height)."""
    image = image.convert("RGB" if channels == 3 else "L")
    if image.size != size:
        image = image.resize(size, Image.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))[None]


def fill_masked(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A1111's "fill" masked content: the masked region (mask 1) painted with the colours around it, by
    normalised convolution (Gaussian blurs of the kept pixels divided by blurs of the kept weight) from
    coarse to fine, so each pixel takes the nearest kept colours. image (1, C, H, W), mask (1, 1, H, W)."""
    from scipy.ndimage import gaussian_filter  # late: only inpaint's "fill" needs it, off the start-up path

    keep = (mask[0, 0] < 0.5).numpy().astype(np.float64)
    if keep.sum() == 0:  # nothing to take colours from
        return torch.zeros_like(image)
    img = image[0].double().numpy()
    filled = np.broadcast_to((img * keep).sum((1, 2), keepdims=True) / keep.sum(), img.shape).copy()
    for sigma in (64, 16, 4, 1):
        weight = gaussian_filter(keep, sigma, mode="nearest")
        valid = weight > 1e-3
        for c in range(img.shape[0]):
            estimate = gaussian_filter(img[c] * keep, sigma, mode="nearest")
            filled[c][valid] = estimate[valid] / weight[valid]
    out = keep * img + (1 - keep) * filled
    return torch.from_numpy(out).float()[None]


def _encode(model: DiffusionModel, image: torch.Tensor) -> torch.Tensor:
    """An image's latent (the VAE's posterior mean), on the VAE's device."""
    with torch.no_grad():
        if model.vae is None:
            return image.to(module_device(model.unet))
        return model.vae.to_latent(model.vae.encode(image.to(module_device(model.vae))).mean)


def _init_latent(model: DiffusionModel, s: Settings, init: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """The init image's latent at the output size (1, C, h, w), by the settings' resize mode."""
    channels = model.spec.image_channels
    if s.resize_mode != "latent_upscale":
        return _encode(model, _image_tensor(fit_image(init, size, s.resize_mode), size, channels))
    f = model.latent_factor  # encode at the image's own size (to the factor), then resize the latent
    own = (max(f, round(init.width / f) * f), max(f, round(init.height / f) * f))
    latent = _encode(model, _image_tensor(init, own, channels))
    return torch.nn.functional.interpolate(latent, size=(size[1] // f, size[0] // f), mode="bilinear",
                                           align_corners=False)


def img2img(model: DiffusionModel, s: Settings, init: Image.Image, text_encoder, **kwargs) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): noise the init image's latent to the level strength x the schedule and
    denoise from there. The init image meets the output size by ``s.resize_mode``."""
    s = s.validate()
    if s.width is None and s.height is None:
        s = replace(s, width=init.width, height=init.height)
    size = output_size(model, s)
    latent = _init_latent(model, s, init, size).expand(s.n, -1, -1, -1)
    pixels = _image_tensor(fit_image(init, size, s.resize_mode), size, model.spec.image_channels) \
        if model.spec.conditioning_channels else None
    if model.spec.conditioning_channels == 4:  # InstructPix2Pix: the image's unscaled latents (its training's)
        with torch.no_grad():
            kwargs["concat"] = model.vae.encode(pixels.to(module_device(model.vae))).mean
        if s.strength >= 1:  # it reads the image through its input: from pure noise at full strength, as diffusers
            latent = None
    elif model.spec.conditioning_channels:  # an inpainting UNet: the whole init image, masked
        kwargs["concat"] = inpainting_conditioning(model, s, size, pixels)
    return _sample(model, s, text_encoder, init_latent=latent, **kwargs)


def mask_box(mask: Image.Image, padding: int, aspect: float) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) that inpaint_only_masked works on: the mask's bounding box
    grown by ``padding`` pixels, then widened or heightened to the output's aspect ratio (width / height)
    as far as the image allows, as A1111's "Only masked" does."""
    bbox = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if bbox is None:
        raise ValueError("the mask is empty (all black): nothing to inpaint")
    W, H = mask.size
    l, t = max(0, bbox[0] - padding), max(0, bbox[1] - padding)
    r, b = min(W, bbox[2] + padding), min(H, bbox[3] + padding)
    w, h = r - l, b - t
    if w / h < aspect:  # too narrow: widen around the centre
        grow = min(W, round(h * aspect)) - w
        l = max(0, min(l - grow // 2, W - (w + grow)))
        r = l + w + grow
    else:
        grow = min(H, round(w / aspect)) - h
        t = max(0, min(t - grow // 2, H - (h + grow)))
        b = t + h + grow
    return l, t, r, b


def outpaint_canvas(init: Image.Image, mask: Image.Image | None, s: Settings) -> tuple[Image.Image, Image.Image]:
    """The init image on a canvas grown by the settings' outpainting borders, and the mask to inpaint it with.

    The new border starts from the colours around it (A1111's "fill", by ``fill_masked``; latent noise or
    nothing then replace it as ``s.inpaint_fill`` says). The mask is white over the new border and 2 x mask
    blur pixels into the image on the grown sides, so that the blurred mask is whole over all the new pixels
    and the seam blends inside the old ones (A1111's poor man's outpainting reaches 1 x blur in, which leaves
    the fill's flat colours showing through the first new pixels). A mask given (the image's size, after any
    inversion) marks more to regenerate inside the image."""
    left, up, right, down = s.outpaint
    w, h = init.width + left + right, init.height + up + down
    image = init.convert("RGB")
    canvas = Image.new("RGB", (w, h))
    canvas.paste(image, (left, up))
    border = Image.new("L", (w, h), 255)
    border.paste(0, (left, up, left + init.width, up + init.height))
    pixels = _image_tensor(canvas, (w, h), 3)
    filled = fill_masked(pixels, torch.from_numpy(np.asarray(border, dtype=np.float32) / 255)[None, None])
    arr = ((filled[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    canvas = Image.fromarray(arr)
    canvas.paste(image, (left, up))  # the image's own pixels exactly, not through the float round trip
    inset = 2 * s.mask_blur
    keep = (left + (inset if left else 0), up + (inset if up else 0),
            left + init.width - (inset if right else 0), up + init.height - (inset if down else 0))
    out = Image.new("L", (w, h), 255)
    if keep[2] > keep[0] and keep[3] > keep[1]:
        out.paste(0, keep)
    if mask is not None:
        grown = Image.new("L", (w, h), 0)
        grown.paste(mask.convert("L"), (left, up))
        out = ImageChops.lighter(out, grown)
    return canvas, out


def inpaint(model: DiffusionModel, s: Settings, init: Image.Image, mask: Image.Image | None, text_encoder,
            **kwargs) -> torch.Tensor:
    """Regenerate where ``mask`` is white (black with ``s.mask_invert``), keep the rest: the unmasked latent
    is blended in at every step, and the decoded result is composited over the init image through the
    blurred mask, so unmasked pixels are exactly the original's.

    ``s.inpaint_fill`` says what the masked region starts from (the original, its surroundings' colours,
    latent noise or a zero latent). With ``s.inpaint_only_masked`` the mask's box (plus padding) is cut
    out, inpainted at the output size and pasted back: the result has the init image's size."""
    s = s.validate()
    if model.spec.conditioning_channels == 4:
        raise ValueError("this is an instruct model (InstructPix2Pix): it edits the whole image from an instruction; "
                         "use img2img (a plain or inpainting checkpoint inpaints)")
    if mask is not None and mask.size != init.size:
        raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {init.size[0]}x"
                         f"{init.size[1]}: they must be the same size")
    if mask is not None:
        mask = mask.convert("L")
        if s.mask_invert:
            mask = ImageOps.invert(mask)
    if any(s.outpaint):
        init, mask = outpaint_canvas(init, mask, s)
    elif mask is None:
        raise ValueError("inpaint needs a mask (white = regenerate, black = keep), or outpainting borders")
    if s.width is None and s.height is None:
        s = replace(s, width=init.width, height=init.height)
    size = output_size(model, s)
    channels = model.spec.image_channels
    if s.inpaint_only_masked:
        box = mask_box(mask, s.inpaint_padding, size[0] / size[1])
        work, work_mask = init.crop(box).resize(size, Image.LANCZOS), mask.crop(box).resize(size, Image.LANCZOS)
        images = _inpaint_region(model, s, work, work_mask, text_encoder, size, **kwargs)
        # paste back: the region at its own size, composited through the blurred full-size mask
        original = _image_tensor(init, init.size, channels)
        bw, bh = box[2] - box[0], box[3] - box[1]
        region = torch.nn.functional.interpolate(images, size=(bh, bw), mode="bicubic", align_corners=False,
                                                 antialias=True).clamp(-1, 1)
        pasted = original.expand(s.n, -1, -1, -1).clone()
        pasted[:, :, box[1]: box[3], box[0]: box[2]] = region
        m = _blurred(mask, init.size, s.mask_blur)
        return m * pasted + (1 - m) * original
    return _inpaint_region(model, s, fit_image(init, size, s.resize_mode), fit_image(mask, size, s.resize_mode),
                           text_encoder, size, **kwargs)


def _blurred(mask: Image.Image, size: tuple[int, int], blur: int) -> torch.Tensor:
    m = mask if mask.size == size else mask.resize(size, Image.LANCZOS)
    if blur:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None, None]  # (1, 1, H, W)


def _inpaint_region(model: DiffusionModel, s: Settings, init: Image.Image, mask: Image.Image, text_encoder,
                    size: tuple[int, int], **kwargs) -> torch.Tensor:
    """Inpaint an image already at the output size."""
    m_px = _blurred(mask, size, s.mask_blur)
    f = model.latent_factor
    m_lat = torch.nn.functional.interpolate(m_px, scale_factor=1 / f, mode="area") if f > 1 else m_px
    original = _image_tensor(init, size, model.spec.image_channels)
    start = fill_masked(original, _blurred(mask, size, 0)) if s.inpaint_fill == "fill" else original
    latent = _encode(model, start).expand(s.n, -1, -1, -1)
    if s.inpaint_fill == "latent_noise":  # the masked latent replaced by each image's own noise
        noise = torch.stack([torch.randn(latent.shape[1:], generator=torch.Generator().manual_seed(s.seed + i))
                             for i in range(s.n)]).to(latent.device)
        latent = latent * (1 - m_lat.to(latent.device)) + noise * m_lat.to(latent.device)
    elif s.inpaint_fill == "latent_nothing":
        latent = latent * (1 - m_lat.to(latent.device))
    if model.spec.conditioning_channels:  # an inpainting UNet reads the mask and the masked image itself: no blend
        binary = (_blurred(mask, size, 0) >= 0.5).float()
        kwargs["concat"] = inpainting_conditioning(model, s, size, original, binary)
        images = _sample(model, s, text_encoder, init_latent=latent, **kwargs)
    else:
        images = _sample(model, s, text_encoder, init_latent=latent, mask=m_lat, **kwargs)
    return m_px * images + (1 - m_px) * original


def describe(model: DiffusionModel, s: Settings, kind: str, index: int, text_encoder, extra: dict | None = None,
             attachments: Sequence[Attachment] = (), refiner: DiffusionModel | None = None) -> tuple[str, dict]:
    """(A1111 parameters text, JSON record) for image ``index`` of a request (its seed is seed + index)."""
    name, implied = resolve(s.sampler)
    schedule = check_schedule(s.schedule) if s.schedule is not None else implied
    w, h = output_size(model, s)
    weights = model.weights_file
    model_hash = file_hash(weights) if weights.exists() else None
    fields = {"Steps": s.steps, "Sampler": a1111_name(name), "Schedule type": "Karras" if schedule == "karras"
              else "Automatic", "CFG scale": f"{s.cfg_scale:g}", "Seed": s.seed + index, "Size": f"{w}x{h}",
              "Model hash": model_hash, "Model": model.name}
    if model.vae_path is not None:
        fields["VAE hash"] = file_hash(model.vae_path) if model.vae_path.is_file() else None
        fields["VAE"] = model.vae_path.name
    for i, module in enumerate(model.module_paths):  # a transformer file's separate parts, as Forge names them
        fields[f"Module {i + 1}"] = module.stem
    if kind in ("img2img", "inpaint", "edit"):
        fields["Denoising strength"] = f"{s.strength:g}"
    if kind == "edit":  # an edit by inversion: from what, how
        fields["Inversion"] = "null-text" if s.null_text else "DDIM"
        fields["Source prompt"] = s.source_prompt
        fields["Edit mask"] = "DiffEdit" if s.edit_mask and s.prompt != s.source_prompt else "off"
    if model.spec.conditioning_channels == 5:  # an inpainting model's image input, as A1111 records it
        fields["Conditional mask weight"] = f"{s.inpainting_mask_weight:g}"
    if model.spec.conditioning_channels == 4 and kind == "img2img":  # InstructPix2Pix's, as A1111 records it
        fields["Image CFG scale"] = f"{s.image_cfg_scale:g}"
    if kind == "txt2img" and model.family.aspect_bins:  # PixArt: the bucket generated at, or that it was not
        binned = sampling_size(model, s, w, h)
        if binned is not None:
            fields["Resolution binning"] = f"{binned[0]}x{binned[1]}"
        elif not s.resolution_binning:
            fields["Resolution binning"] = "off"
    if kind == "txt2img" and s.hires_scale > 1:  # A1111's hires fix fields
        if s.hires_strength > 0:
            fields["Denoising strength"] = f"{s.hires_strength:g}"
        fields["Hires upscale"] = f"{s.hires_scale:g}"
        if s.hires_steps:
            fields["Hires steps"] = s.hires_steps
        fields["Hires upscaler"] = s.hires_upscaler
        if s.sr_noise_level is not None:
            fields["SR noise level"] = s.sr_noise_level
    refined = None
    if refiner is not None:  # as A1111 writes it: Refiner: NAME [HASH], Refiner switch at: 0.8
        file = refiner.weights_file
        refined = {"path": str(refiner.path.resolve()), "name": refiner.name, "arch": refiner.arch,
                   "unet_sha256_10": file_hash(file) if file.exists() else None}
        fields["Refiner"] = f"{refiner.name} [{refined['unet_sha256_10']}]" if refined["unet_sha256_10"] else \
            refiner.name
        fields["Refiner switch at"] = f"{s.refiner_switch_at:g}"
    if s.tile:
        fields["Tile size"] = s.tile
    if s.vae_tile:
        fields["VAE tile"] = s.vae_tile
    if s.watermark:
        fields["Watermark"] = "invisible-watermark dwtDct"
    if kind in ("img2img", "inpaint", "edit") and s.resize_mode != "just_resize":
        fields["Resize mode"] = RESIZE_LABELS[s.resize_mode]
    if kind == "inpaint":
        fields["Mask blur"] = s.mask_blur
        if s.mask_invert:
            fields["Mask mode"] = "Inpaint not masked"
        fields["Masked content"] = s.inpaint_fill.replace("_", " ")
        if any(s.outpaint):
            sides = zip(("left", "up", "right", "down"), s.outpaint, strict=True)
            fields["Outpaint"] = " ".join(f"{side} {px}" for side, px in sides if px)
        if s.inpaint_only_masked:
            fields["Inpaint area"] = "Only masked"
            fields["Masked area padding"] = s.inpaint_padding
    if s.clip_skip is not None and s.clip_skip > 1:
        fields["Clip skip"] = s.clip_skip
    if s.noise_seed_delta and SAMPLERS[name].stochastic:
        fields["ENSD"] = s.noise_seed_delta
    if s.guidance_rescale:
        fields["Guidance rescale"] = f"{s.guidance_rescale:g}"
    if distils_guidance(model):  # as Forge writes it
        fields["Distilled CFG Scale"] = f"{s.distilled_cfg_scale:g}"
    records = {unit_kind: [u.record() for u in units] for unit_kind, units in by_kind(attachments).items()}
    for unit_kind, kind_records in records.items():  # "Lora hashes", "TI hashes", "ControlNet N", ...
        fields.update(unit_kind.a1111(kind_records, sum(k.startswith("ControlNet ") for k in fields)))
    fields["Version"] = f"imagine {__version__}"
    record = {
        "kind": kind, "settings": {**s.to_dict(), "seed": s.seed + index, "n": 1}, "index": index,
        "model": {"path": str(model.path.resolve()), "name": model.name, "unet_sha256_10": model_hash,
                  "arch": model.arch, "vae": str(model.vae_path.resolve()) if model.vae_path else None,
                  "modules": [str(m.resolve()) for m in model.module_paths],
                  "text_encoder": getattr(text_encoder, "identity", None), "spec": asdict(model.spec)},
        "sampler": {"name": name, "schedule": schedule, "spacing": "trailing"},
        "precision": s.precision, "weights_dtype": weights_dtype(model.unet),
        "device": str(module_device(model.unet)), "versions": environment(), **(extra or {}),
    }
    if refined is not None:
        record["refiner"] = refined
    for unit_kind, kind_records in records.items():
        record[unit_kind.record_key] = kind_records
    return a1111_parameters(s.prompt, s.negative_prompt, fields), record
