"""AUTOMATIC1111-compatible endpoints (/sdapi/v1): request and response JSON as stable-diffusion-webui's
modules/api/api.py shapes them, so existing clients and scripts work unchanged. Generation goes through
the same queue as the job API (a full queue answers 429); the call returns when the images are done."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Body
from PIL import ImageOps

from imagine import __version__
from imagine.io.png import parse_a1111
from imagine.pipelines import generate as g
from imagine.samplers import A1111_NAMES, SAMPLERS, a1111_name, resolve
from imagine.server.jobs import Job
from imagine.server.schemas import (
    A1111ImageResponse,
    A1111Img2Img,
    A1111Txt2Img,
    PngInfoRequest,
    PngInfoResponse,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
)
from imagine.server.service import RequestError, Service, decode_image, png_base64

# A1111's schedulers (modules/sd_schedulers.py) that we implement: name -> (label, our schedule or None for
# "the sampler's own", default rho)
SCHEDULERS = {"automatic": ("Automatic", None, -1.0), "uniform": ("Uniform", "default", -1.0),
              "karras": ("Karras", "karras", 7.0)}


def _scheduler(value: str | None) -> str | None:
    if value is None:
        return None
    for name, (label, ours, _) in SCHEDULERS.items():
        if value.strip().lower() in (name, label.lower()):
            return ours
    raise RequestError(f"scheduler {value!r} unknown; choose one of: "
                       f"{', '.join(label for label, _, _ in SCHEDULERS.values())}")


def router(service: Service) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 compatible"])

    def job_request(body: A1111Txt2Img, kind: str) -> dict[str, Any]:
        sampler = body.sampler_name or body.sampler_index or "DPM++ 2M"
        try:
            resolve(sampler)
        except ValueError as err:
            raise RequestError(str(err)) from None
        override = body.override_settings or {}
        request = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "steps": body.steps,
                   "sampler": sampler, "schedule": _scheduler(body.scheduler), "cfg_scale": body.cfg_scale,
                   "seed": body.seed, "n": body.batch_size * body.n_iter, "width": body.width,
                   "height": body.height, "model": override.get("sd_model_checkpoint"), "previews": True}
        if kind != "txt2img":
            request["strength"] = body.denoising_strength if body.denoising_strength is not None else 0.75
        return request

    async def run(job: Job) -> Job:
        service.queue.submit(job)
        while not job.done:
            await asyncio.sleep(0.02)
        if job.status == "failed":
            raise RequestError(f"generation failed: {job.error}", 422 if job.bad_request else 500)
        return job

    def info(job: Job, body: A1111Txt2Img) -> str:
        req, entry = job.request, service.store.lookup(job.model)
        settings = job.inputs["settings"]
        name, implied = resolve(settings.sampler)
        schedule = settings.schedule or implied
        n = settings.n
        seeds = [req["seed"] + i for i in range(n)]
        width, height = g.output_size(service.store.get(job.model)[0], settings)
        out = {
            "prompt": settings.prompt, "all_prompts": [settings.prompt] * n,
            "negative_prompt": settings.negative_prompt, "all_negative_prompts": [settings.negative_prompt] * n,
            "seed": req["seed"], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
            "width": width, "height": height, "sampler_name": a1111_name(name),
            "cfg_scale": settings.cfg_scale, "steps": settings.steps, "batch_size": body.batch_size,
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": entry.name,
            "sd_model_hash": entry.short_hash, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": settings.strength if job.kind != "txt2img" else None,
            "extra_generation_params": {"Schedule type": "Karras" if schedule == "karras" else "Automatic"},
            "index_of_first_image": 0, "infotexts": [im.parameters for im in job.images], "styles": body.styles or [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), "clip_skip": 1,
            "is_using_inpainting_conditioning": False, "version": f"imagine {__version__}",
            "interrupted": job.status == "cancelled",
        }
        return json.dumps(out)

    def response(job: Job, body: A1111Txt2Img, echo: dict[str, Any]) -> A1111ImageResponse:
        images = [png_base64(im.png) for im in job.images] if body.send_images else []
        return A1111ImageResponse(images=images, parameters=echo, info=info(job, body))

    @api.post("/txt2img", response_model=A1111ImageResponse)
    async def txt2img(body: A1111Txt2Img) -> A1111ImageResponse:
        job = service.make_job(job_request(body, "txt2img"), "txt2img", save=body.save_images)
        return response(await run(job), body, body.model_dump())

    @api.post("/img2img", response_model=A1111ImageResponse)
    async def img2img(body: A1111Img2Img) -> A1111ImageResponse:
        """With a `mask`, inpainting (white = regenerate)."""
        kind = "inpaint" if body.mask else "img2img"
        request = job_request(body, kind)
        request["init_image"] = body.init_images[0]
        if body.mask:
            request["mask"] = body.mask
            request["mask_blur"] = body.mask_blur
        job = service.make_job(request, kind, save=body.save_images)
        if body.mask and body.inpainting_mask_invert:  # A1111: 1 = regenerate where the mask is black
            job.inputs["mask"] = ImageOps.invert(job.inputs["mask"].convert("L"))
        echo = body.model_dump()
        if not body.include_init_images:
            echo["init_images"], echo["mask"] = None, None
        return response(await run(job), body, echo)

    @api.post("/png-info", response_model=PngInfoResponse)
    def png_info(body: PngInfoRequest) -> PngInfoResponse:
        image = decode_image(body.image, "the image", service.limits)
        items = {k: v for k, v in image.info.items() if isinstance(v, (str, int, float)) and k != "parameters"}
        text = image.info.get("parameters") if isinstance(image.info.get("parameters"), str) else None
        return PngInfoResponse(info=text or "", items=items, parameters=parse_a1111(text) if text else {})

    @api.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = False) -> ProgressResponse:
        job = service.queue.current
        counts = service.queue.counts()
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                 "job_count": counts["queued"] + counts["running"], "job_timestamp": "0", "job_no": 0,
                 "sampling_step": 0, "sampling_steps": 0}
        if job is None:
            return ProgressResponse(progress=0.0, eta_relative=0.0, state=state, current_image=None, textinfo=None)
        state.update(job=f"{job.kind} {job.id}", interrupted=job.cancel_event.is_set(),
                     job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                     sampling_step=job.step, sampling_steps=job.total)
        image = None if skip_current_image or job.preview is None else png_base64(job.preview)
        return ProgressResponse(progress=job.progress, eta_relative=job.eta() or 0.0, state=state,
                                current_image=image, textinfo=f"step {job.step} of {job.total}")

    @api.post("/interrupt")
    def interrupt() -> dict:
        """Stop the running job at the end of its current step (A1111 semantics: queued jobs go on)."""
        job = service.queue.current
        if job is not None:
            service.queue.cancel(job)
        return {}

    @api.get("/options")
    def get_options() -> dict[str, Any]:
        entry = service.store.lookup(None)
        return {**service.options, "sd_model_checkpoint": entry.title, "sd_checkpoint_hash": entry.sha256}

    @api.post("/options")
    def set_options(body: dict[str, Any] = Body(...)) -> None:
        """Switch the model with {"sd_model_checkpoint": name or title}; other known options are stored."""
        if "sd_model_checkpoint" in body:
            try:
                service.store.select(str(body["sd_model_checkpoint"]))
            except KeyError as err:
                raise RequestError(err.args[0], 400) from None
        unknown = sorted(set(body) - set(service.options) - {"sd_model_checkpoint", "sd_checkpoint_hash"})
        if unknown:
            raise RequestError(f"options {unknown} are not supported here; supported: "
                               f"{sorted(['sd_model_checkpoint', *service.options])}", 400)
        service.options.update({k: v for k, v in body.items() if k in service.options})
        return None

    @api.get("/sd-models", response_model=list[SDModelItem])
    def sd_models() -> list[SDModelItem]:
        return [SDModelItem(title=e.title, model_name=e.name, hash=e.short_hash, sha256=e.sha256,
                            filename=str(e.path.resolve()), config=None) for e in service.store.entries()]

    @api.get("/samplers", response_model=list[SamplerItem])
    def samplers() -> list[SamplerItem]:
        out = []
        for name in SAMPLERS:
            display = a1111_name(name)
            aliases = [name] + [a for a, (s, sched) in A1111_NAMES.items() if s == name and a != display]
            out.append(SamplerItem(name=display, aliases=aliases, options={}))
        return out

    @api.get("/schedulers", response_model=list[SchedulerItem])
    def schedulers() -> list[SchedulerItem]:
        return [SchedulerItem(name=name, label=label, aliases=None, default_rho=rho, need_inner_model=False)
                for name, (label, _, rho) in SCHEDULERS.items()]

    return api
