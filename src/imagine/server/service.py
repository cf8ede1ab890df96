"""What the routes share: the model store, the job queue, the limits, and the job runner (pipelines only)."""

from __future__ import annotations

import base64
import binascii
import io
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from imagine.io.png import encode_png, free_path
from imagine.pipelines import generate as g
from imagine.pipelines.unconditional import to_uint8
from imagine.server.jobs import ImageResult, Job, JobQueue
from imagine.server.models import ModelStore


class RequestError(ValueError):
    """A request the server refuses: ``status`` is the HTTP code (4xx), the message says what to change."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 512 * 512  # per image, width x height
    max_steps: int = 150
    max_batch: int = 8  # images per request
    max_request_bytes: int = 16 * 1024 * 1024
    max_input_pixels: int = 2048 * 2048  # init images and masks, before resizing


def decode_image(data: str, what: str, limits: Limits) -> Image.Image:
    """A base64 (or data: URL) image, checked: readable, and not a decompression bomb."""
    if not isinstance(data, str) or not data:
        raise RequestError(f"{what} is empty: send a base64-encoded PNG or JPEG")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > limits.max_input_pixels:
                raise RequestError(f"{what} is {img.width}x{img.height}, over the limit max_input_pixels="
                                   f"{limits.max_input_pixels}", 413)
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise RequestError(f"{what} is not a readable image ({type(err).__name__}): send a PNG or JPEG") from None


def png_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def preview_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Service:
    def __init__(self, store: ModelStore, out_dir: Path | None, limits: Limits, max_queue: int):
        self.store, self.out_dir, self.limits = store, out_dir, limits
        self.queue = JobQueue(self.run, max_queue=max_queue, cancelled_error=g.Cancelled)
        self.options: dict[str, Any] = {"samples_format": "png", "CLIP_stop_at_last_layers": 1,
                                        "eta_noise_seed_delta": 0}

    # -- building jobs
    def make_job(self, request: dict[str, Any], kind: str, *, save: bool = True) -> Job:
        """Check a request against the model and the limits, decode its images: a Job ready to queue.
        Raises RequestError naming what is wrong."""
        try:
            entry = self.store.lookup(request.get("model"))
        except KeyError as err:
            raise RequestError(err.args[0], 404) from None
        lim = self.limits
        seed = request.get("seed")
        if seed is None or seed == -1:
            seed = secrets.randbelow(2**31)
        settings = g.Settings(
            prompt=request["prompt"], negative_prompt=request["negative_prompt"], schedule=request.get("schedule"),
            guidance_rescale=request.get("guidance_rescale", 0.0), seed=seed, n=request["n"],
            width=request.get("width"), height=request.get("height"), strength=request.get("strength", 0.75),
            mask_blur=request.get("mask_blur", 4),
        ).with_model_defaults(entry.spec, request.get("steps"), request.get("sampler"), request.get("cfg_scale"))
        if settings.steps > lim.max_steps:
            raise RequestError(f"steps {settings.steps} is over the limit max_steps={lim.max_steps}")
        if request["n"] > lim.max_batch:
            raise RequestError(f"{request['n']} images per request is over the limit max_batch={lim.max_batch}")
        try:
            settings.validate()
        except ValueError as err:
            raise RequestError(str(err)) from None
        inputs: dict[str, Any] = {}
        if kind in ("img2img", "inpaint"):
            if not request.get("init_image"):
                raise RequestError(f"{kind} needs an init image")
            inputs["init"] = decode_image(request["init_image"], "the init image", lim)
            if settings.width is None and settings.height is None:
                settings = replace(settings, width=inputs["init"].width, height=inputs["init"].height)
        if kind == "inpaint":
            if not request.get("mask"):
                raise RequestError("inpaint needs a mask (white = regenerate, black = keep)")
            inputs["mask"] = decode_image(request["mask"], "the mask", lim)
            if inputs["mask"].size != inputs["init"].size:
                raise RequestError(f"the mask is {inputs['mask'].width}x{inputs['mask'].height} but the image is "
                                   f"{inputs['init'].width}x{inputs['init'].height}: they must be the same size")
        w, h = self._output_size(entry.name, settings)
        if w * h > lim.max_pixels:
            raise RequestError(f"{w}x{h} is {w * h} pixels, over the limit max_pixels={lim.max_pixels}")
        record = {k: v for k, v in request.items() if k not in ("init_image", "mask")}
        inputs["settings"], inputs["save"] = settings, save
        return Job(kind=kind, request={**record, "seed": seed}, model=entry.name, inputs=inputs)

    def _output_size(self, name: str, settings: g.Settings) -> tuple[int, int]:
        model, _ = self.store.get(name)
        if settings.steps > model.spec.num_train_timesteps:
            raise RequestError(f"steps ({settings.steps}) cannot exceed the model's {model.spec.num_train_timesteps} "
                               "training timesteps")
        try:
            return g.output_size(model, settings)
        except ValueError as err:
            raise RequestError(str(err)) from None

    # -- running them (the worker thread)
    def run(self, job: Job) -> None:
        model, encoder = self.store.get(job.model)
        settings: g.Settings = job.inputs["settings"]
        every = 1

        def progress(info: dict) -> None:
            nonlocal every
            i, total = info["i"] + 1, info["total"]
            every = max(1, total // 8)
            changes: dict[str, Any] = {"step": i, "total": total, "progress": min(0.99, i / total)}
            if job.request.get("previews", True) and (i % every == 0 or i == total):
                changes["preview"] = self._preview(model, info["denoised"][:1])
            job.update(**changes)

        kwargs = {"callback": progress, "cancel": job.cancel_event.is_set}
        with torch.no_grad():
            if job.kind == "txt2img":
                images = g.txt2img(model, settings, encoder, **kwargs)
            elif job.kind == "img2img":
                images = g.img2img(model, settings, job.inputs["init"], encoder, **kwargs)
            else:
                images = g.inpaint(model, settings, job.inputs["init"], job.inputs["mask"], encoder, **kwargs)
        extra = {"server": {"job": job.id}}
        results = []
        for i, pixels in enumerate(to_uint8(images)):
            parameters, record = g.describe(model, settings, job.kind, i, encoder, extra)
            data = encode_png(pixels, parameters, record)
            path = None
            if self.out_dir is not None and job.inputs["save"]:
                target = free_path(self.out_dir, f"{settings.seed + i:06d}-{job.kind}")
                target.write_bytes(data)  # free_path never returns an existing file
                path = str(target)
            results.append(ImageResult(data, settings.seed + i, parameters, record, path))
        job.update(images=results)

    @staticmethod
    def _preview(model, denoised: torch.Tensor) -> bytes:
        if model.vae is not None:
            denoised = model.vae.decode(model.vae.from_latent(denoised))
        return preview_png(to_uint8(denoised.clamp(-1, 1))[0])
