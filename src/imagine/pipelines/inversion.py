"""Editing a real image by inversion: DDIM run backwards finds the noise that makes a given image (Song et al.
2021's encoding property), and sampling from that noise with another prompt edits it.

- ``invert``: the image's latent walked up the sampling's own noise levels by the deterministic sampler's step
  taken backwards, under the prompt that describes the image (its conditional branch alone, as the inversion
  literature does). At each step the network reads the current latent at the next level, as diffusers'
  DDIMInverseScheduler and the null-text authors' code do. The levels and the step are the model's own
  (diffusion/model_sampling.py), so a flow model (SD3, Flux) inverts along its straight path by the same code:
  Euler's step is DDIM's in the VE view.
- Null-text inversion (Mokady et al. 2022): with classifier-free guidance the walk back down drifts from the
  inverted one; optimising the unconditional text states at each step (Adam, lr 1e-2 x (1 - i / 100), at most
  ``inner`` iterations, stopping at a loss of 1e-5 + 2e-5 i) pulls each guided step onto the inverted latent,
  so the image comes back at the guidance scale the edit needs.
- ``edit``: sampling from the inverted noise with the target prompt (and the null-text states); with
  ``edit_mask``, DiffEdit's mask (Couairon et al. 2022): where the two prompts' noise predictions differ on the
  image noised half way (10 draws, clamped at 3x their mean, normalised, > 0.5) the edit is sampled, elsewhere
  the inverted latents are put back at every step, and the result is pasted over the image through the mask
  (blurred 4 px), so the rest of the image keeps its pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageFilter
from safetensors import safe_open
from safetensors.torch import save_file

from imagine.adapters.attachment import Attachment, by_kind
from imagine.data.transforms import fit_image
from imagine.devices import module_device, to_device
from imagine.diffusion.model_sampling import model_sampling
from imagine.guidance import ClassifierFreeGuidance
from imagine.io.model_folder import DiffusionModel
from imagine.io.png import file_hash
from imagine.pipelines.generate import (
    Cancelled,
    _check_text_model,
    _image_tensor,
    _init_latent,
    _TwoRowFloor,
    branches,
    decode,
    embeds_guidance,
    output_size,
)
from imagine.pipelines.settings import Settings

MASK_MAPS = 10  # DiffEdit's noise draws per mask
MASK_STRENGTH = 0.5  # ... at this fraction of the schedule
MASK_CLAMP = 3.0  # ... the difference clamped at this many times its mean
MASK_BLUR = 4  # pixels: the pasting mask's blur


@dataclass
class Inversion:
    """An image walked up to noise: ``latents[k]`` is the latent at ``levels[k]`` (ascending: ``latents[0]`` the
    image's own, ``latents[-1]`` where sampling starts); ``null``: null-text inversion's unconditional text
    states for each sampling step, the first step's first."""

    latents: list[torch.Tensor]
    levels: torch.Tensor
    null: list[torch.Tensor] | None = None


def _levels(model: DiffusionModel, s: Settings, latent_hw: tuple[int, int]):
    plan = model_sampling(model.spec, latent_hw)
    sigmas = plan.sigmas(s.steps)  # descending, ending at 0
    run = max(1, round(s.strength * s.steps))
    return plan, sigmas[s.steps - run:].flip(0)


class _Progress:
    """One count of steps over the stages of an edit (inversion, null-text, sampling): the callback gets
    ``{"i", "total", "stage", "denoised"}`` as the samplers' callbacks do; cancel is asked at every step."""

    def __init__(self, callback, cancel, total: int):
        self.callback, self.cancel, self.total, self.i = callback, cancel, total, 0

    def __call__(self, stage: str, denoised: torch.Tensor) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled(f"cancelled at step {self.i + 1} of {self.total} ({stage})")
        if self.callback is not None:
            self.callback({"i": self.i, "total": self.total, "stage": stage, "denoised": denoised})
        self.i += 1


def _total(s: Settings, inverting: bool) -> int:
    run = max(1, round(s.strength * s.steps))
    return run * (1 + inverting * (1 + s.null_text))


def _sized(s: Settings, image: Image.Image) -> Settings:
    """The image's own size where none is asked."""
    return replace(s, width=image.width, height=image.height) if s.width is None and s.height is None else s


def check_edit(model: DiffusionModel, s: Settings, text_encoder, attachments: Sequence[Attachment] = ()) -> None:
    """What an edit by inversion cannot do, refused before any work (the text encoder checked where given)."""
    if text_encoder is not None:
        _check_text_model(model, text_encoder)
    if model.spec.conditioning_channels:
        raise ValueError("editing by inversion walks a plain text-to-image model; this is an inpainting or instruct "
                         "checkpoint (for an instruct model, img2img with the instruction is its edit)")
    if embeds_guidance(model) or model.spec.consistency:
        raise ValueError("a consistency model (LCM) has no deterministic sampler to invert: edit with the model it "
                         "was distilled from")
    if model.spec.upscale > 1:
        raise ValueError("a super-resolution stage cannot be inverted from text; edit with the base model")
    if s.n != 1:
        raise ValueError("an edit by inversion is deterministic: ask for n = 1")
    if s.backend != "torch" or s.tile:
        raise ValueError("inversion runs on the torch backend, untiled: leave backend and tile at their defaults")
    stepwise = [kind.kind.replace("_", "-") for kind in by_kind(attachments) if kind.per_step]
    if stepwise:
        raise ValueError(f"editing by inversion does not take {', '.join(stepwise)} units; LoRAs and embeddings work")


def invert(model: DiffusionModel, s: Settings, image: Image.Image, text_encoder, *,
           callback: Callable[[dict], None] | None = None, cancel: Callable[[], bool] | None = None,
           attachments: Sequence[Attachment] = (), inner: int = 10, progress: _Progress | None = None) -> Inversion:
    """DDIM inversion of ``image`` (at the output size, by the resize mode) under ``s.source_prompt``, over
    ``s.strength`` of ``s.steps``; with ``s.null_text``, the null-text states for guidance at ``s.cfg_scale``."""
    s = _sized(s.validate(), image)
    check_edit(model, s, text_encoder, attachments)
    size = output_size(model, s)
    f = model.latent_factor
    plan, levels = _levels(model, s, (size[1] // f, size[0] // f))
    z = _init_latent(model, s, image, size)
    source = replace(s, prompt=s.source_prompt)
    cond, uncond, _, _ = (to_device(part, z.device) for part in branches(model, source, text_encoder, size))
    denoiser = _TwoRowFloor(plan.denoiser(model.unet))
    report = progress or _Progress(callback, cancel, _total(s, True) - (len(levels) - 1))
    latents = [z]
    with torch.no_grad():
        for k in range(len(levels) - 1):
            a, b = levels[k], levels[k + 1]
            x_in = plan.relabel(z, a, b)  # the current latent, read at the next level
            d = (x_in - denoiser(x_in, b, cond)) / b
            z = z + (b - a) * d
            latents.append(z)
            report("inversion", latents[0])
    null = None
    if s.null_text:
        null = _null_text(plan, denoiser, cond, uncond, s.cfg_scale, latents, levels, inner, report)
    return Inversion(latents, levels, null)


def _null_text(plan, denoiser, cond: dict, uncond: dict, cfg: float, latents: list[torch.Tensor],
               levels: torch.Tensor, inner: int, report) -> list[torch.Tensor]:
    """Mokady et al.'s null-text optimisation: per step, the unconditional text states that bring the guided
    step from the current latent onto the inverted one below it (the loss in the network's own latent scale)."""
    context = uncond["encoder_hidden_states"].detach().clone()
    x, out = latents[-1], []

    def step(x, a, b, x0_c, ctx: torch.Tensor) -> torch.Tensor:  # the guided step from a down to b
        x0_u = denoiser(x, a, {**uncond, "encoder_hidden_states": ctx})
        x0 = x0_u + cfg * (x0_c - x0_u)
        return x + (b - a) * (x - x0) / a

    for i, k in enumerate(range(len(levels) - 1, 0, -1)):
        a, b = levels[k], levels[k - 1]
        with torch.no_grad():
            x0_c = denoiser(x, a, cond)
        target = plan.relabel(latents[k - 1], b, 0)
        context = context.detach().clone().requires_grad_(True)  # each step's own states (Adam writes in place)
        optimizer = torch.optim.Adam([context], lr=1e-2 * (1 - i / 100))
        for _ in range(inner):
            with torch.enable_grad():
                loss = torch.nn.functional.mse_loss(plan.relabel(step(x, a, b, x0_c, context), b, 0), target)
                (grad,) = torch.autograd.grad(loss, [context])
            context.grad = grad
            optimizer.step()
            if loss.item() < 1e-5 + i * 2e-5:
                break
        context = context.detach()
        out.append(context)
        with torch.no_grad():
            x = step(x, a, b, x0_c, context)
        report("null-text", x0_c)
    return out


def edit_mask(model: DiffusionModel, s: Settings, image: Image.Image, text_encoder) -> torch.Tensor:
    """DiffEdit's mask at the latent's size (1, 1, h, w), 1 where the target prompt changes the image: the
    image's latent noised half way (seeded by ``s.seed``), the two prompts' conditional predictions compared."""
    s = _sized(s, image)
    size = output_size(model, s)
    f = model.latent_factor
    plan = model_sampling(model.spec, (size[1] // f, size[0] // f))
    sigmas = plan.sigmas(s.steps)
    sigma = sigmas[min(s.steps - 1, int(s.steps * (1 - MASK_STRENGTH)))]
    z = _init_latent(model, s, image, size)
    g = torch.Generator().manual_seed(int(s.seed))
    noise = torch.randn((MASK_MAPS, *z.shape[1:]), generator=g).to(z.device)
    x = plan.noised(z.expand(MASK_MAPS, -1, -1, -1), noise, sigma)
    denoiser = plan.denoiser(model.unet)
    predictions = []
    with torch.no_grad():
        for prompt in (s.prompt, s.source_prompt):
            cond = to_device(branches(model, replace(s, prompt=prompt, n=MASK_MAPS), text_encoder, size)[0], z.device)
            predictions.append(denoiser(x, sigma, cond))
    diff = (predictions[0] - predictions[1]).abs().mean(dim=(0, 1), keepdim=True)[:1]  # (1, 1, h, w)
    diff = diff.clamp(max=MASK_CLAMP * float(diff.mean()))
    diff = diff / diff.max().clamp(min=1e-12)
    return (diff > 0.5).float()


def edit(model: DiffusionModel, s: Settings, image: Image.Image, text_encoder, *,
         inversion: Inversion | None = None, callback: Callable[[dict], None] | None = None,
         cancel: Callable[[], bool] | None = None, attachments: Sequence[Attachment] = ()) -> torch.Tensor:
    """``image`` edited from ``s.source_prompt`` to ``s.prompt`` (the same prompt: its reconstruction), (1, C, H,
    W) in [-1, 1]. ``inversion``: one made before for these settings (``invert``), else made here."""
    s = _sized(s.validate(), image)
    check_edit(model, s, text_encoder, attachments)
    size = output_size(model, s)
    f = model.latent_factor
    report = _Progress(callback, cancel, _total(s, inversion is None))
    if inversion is None:
        inversion = invert(model, s, image, text_encoder, attachments=attachments, progress=report)
    plan, levels = _levels(model, s, (size[1] // f, size[0] // f))
    if len(levels) != len(inversion.levels) or not torch.allclose(levels, inversion.levels):
        raise ValueError("the inversion was made over other noise levels (steps or strength differ): invert again "
                         "with these settings")
    mask = edit_mask(model, s, image, text_encoder) if s.edit_mask and s.prompt != s.source_prompt else None
    cond, uncond, _, cfg = (to_device(part, module_device(model.unet)) for part in branches(model, s, text_encoder,
                                                                                             size))
    guided = ClassifierFreeGuidance(_TwoRowFloor(plan.denoiser(model.unet)), uncond, cfg, s.guidance_rescale)
    device = module_device(model.unet)  # an inversion read from a file comes on the CPU
    latents = [z.to(device) for z in inversion.latents]
    null = [c.to(device) for c in inversion.null] if inversion.null is not None else None
    x = latents[-1]
    with torch.no_grad():
        for i, k in enumerate(range(len(levels) - 1, 0, -1)):
            if null is not None:
                guided.uncond = {**uncond, "encoder_hidden_states": null[i]}
            a, b = levels[k], levels[k - 1]
            x0 = guided(x, a, cond)
            x = x + (b - a) * (x - x0) / a
            if mask is not None:  # the rest of the image: its own inverted latents, step by step
                x = mask * x + (1 - mask) * latents[k - 1]
            report("edit", x0)
        images = decode(model, x, vae_tile=s.vae_tile).clamp(-1, 1)
    if mask is None:
        return images
    original = _image_tensor(fit_image(image, size, s.resize_mode), size, model.spec.image_channels)
    return pasted(images, original, mask, size)


def pasted(images: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The edit pasted over the original through the latent mask, upsampled and blurred by MASK_BLUR pixels."""
    up = torch.nn.functional.interpolate(mask.float().cpu(), size=(size[1], size[0]), mode="nearest")
    pil = Image.fromarray((up[0, 0].numpy() * 255).astype("uint8")).filter(ImageFilter.GaussianBlur(MASK_BLUR))
    m = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255)[None, None]
    return m * images + (1 - m) * original


# what an inversion file must agree on with the edit that reads it
_KEYS = ("model", "image", "source_prompt", "negative_prompt", "steps", "strength", "width", "height", "resize_mode",
         "null_text", "cfg_scale", "clip_skip")


def inversion_identity(model: DiffusionModel, s: Settings, image_hash: str | None) -> dict[str, str]:
    """What an inversion depends on, as strings (safetensors metadata): an edit reading it must agree."""

    weights = model.weights_file
    out = {"model": file_hash(weights) if weights.exists() else model.name, "image": image_hash or "",
           **{k: str(getattr(s, k)) for k in _KEYS[2:] if k != "cfg_scale"}}
    out["cfg_scale"] = str(s.cfg_scale) if s.null_text else "any"  # plain DDIM inversion does not read it
    return out


def save_inversion(path, inversion: Inversion, identity: dict[str, str]) -> None:
    """An inversion as a safetensors file (written atomically): its latents, levels and null-text states."""


    tensors = {f"latents.{k}": z.cpu().contiguous() for k, z in enumerate(inversion.latents)}
    tensors["levels"] = inversion.levels.cpu().contiguous()
    for i, ctx in enumerate(inversion.null or []):
        tensors[f"null.{i}"] = ctx.cpu().contiguous()
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata={"format": "imagine-inversion", **identity})
    os.replace(tmp, path)


def load_inversion(path, identity: dict[str, str]) -> Inversion:
    """An inversion file, checked to have been made for ``identity`` (inversion_identity): another model,
    image, source prompt or other levels is refused by name."""

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # a file that is not safetensors: say so, whatever the reader raised
        raise ValueError(f"{path} is not an inversion file (safetensors): {err}") from None
    if meta.get("format") != "imagine-inversion":
        raise ValueError(f"{path} is not an imagine inversion (imagine invert --save writes them)")
    differ = [f"{k} ({meta.get(k)!r} there, {v!r} here)" for k, v in identity.items() if meta.get(k) != v]
    if differ:
        raise ValueError(f"{path} was inverted with other settings: {'; '.join(differ)}. Invert again with these "
                         "(or edit without --inversion)")
    n = sum(k.startswith("latents.") for k in tensors)
    nulls = sum(k.startswith("null.") for k in tensors)
    return Inversion([tensors[f"latents.{k}"] for k in range(n)], tensors["levels"],
                     [tensors[f"null.{i}"] for i in range(nulls)] if nulls else None)
