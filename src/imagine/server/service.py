"""What the routes share: the model store, the job queue, the limits, and the job runner (pipelines only)."""

from __future__ import annotations

import base64
import binascii
import io
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from imagine.a1111 import A1111_OPTIONS
from imagine.adapters.control import ControlUnit
from imagine.adapters.image_prompt import ImagePromptUnit
from imagine.devices import module_device
from imagine.pipelines import generate as g
from imagine.pipelines.output import save
from imagine.pipelines.request import Request, run
from imagine.pipelines.settings import Settings, schemas
from imagine.pipelines.unconditional import to_uint8
from imagine.pipelines.upscale import hires_size, resolve_upscaler
from imagine.pipelines.upscale import upscale_pictures as run_upscale
from imagine.server.jobs import ImageResult, Job, JobQueue
from imagine.server.jobstore import JobStore
from imagine.server.models import ModelStore
from imagine.server.schemas import JobRequest

# request fields that pass into the pipeline Settings when given: every setting the job API takes
SETTINGS_FIELDS = tuple(s["name"] for s in schemas() if s["api"])



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
    max_kept_bytes: int = 256 * 1024 * 1024  # finished jobs' PNGs kept in the job store


def decode_image(data: str, what: str, limits: Limits) -> Image.Image:
    """A base64 (or data: URL) image, checked: readable, within max_input_pixels (one status, 413, for every
    image over it, decompression bombs included), and with text chunks that inflate within Pillow's limit."""
    if not isinstance(data, str) or not data:
        raise RequestError(f"{what} is empty: send a base64-encoded PNG or JPEG")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64") from None
    too_large = RequestError(f"{what} is larger than this server takes (max_input_pixels={limits.max_input_pixels}"
                             "): send a smaller image", 413)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > limits.max_input_pixels:
                raise too_large
            img.load()
            return img.copy()
    except RequestError:
        raise
    except Image.DecompressionBombError:
        raise too_large from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:  # ValueError: a text chunk bomb
        raise RequestError(f"{what} is not a readable image ({type(err).__name__}): send a PNG or JPEG") from None


def png_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def preview_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def typed_request(request: dict[str, Any] | JobRequest, kind: str) -> JobRequest:
    """A request from any door (the job API, A1111's endpoints, a restart's payload) as the one typed
    JobRequest: the same types and bounds for all, one 422 naming the fields."""
    if isinstance(request, JobRequest):
        request = request.model_dump()
    try:
        return JobRequest.model_validate({**request, "kind": kind})
    except ValidationError as err:
        raise RequestError(describe_validation(err.errors())) from None


def checked_fields(request: dict[str, Any] | JobRequest, kind: str) -> dict[str, Any]:
    """The typed request's fields, as the job's record keeps them."""
    return typed_request(request, kind).model_dump()


def describe_validation(errors: list[dict]) -> str:
    """Pydantic's errors as one line a person can act on."""
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        if e.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})")
        else:
            parts.append(f"{where}: {e.get('msg')}")
    return "; ".join(parts)


class Service:
    def __init__(self, store: ModelStore, out_dir: Path | None, limits: Limits, max_queue: int,
                 allow_paths: bool = False, watermark: bool = False, sign_key=None, queue=None):
        """``queue``: a cluster.RedisJobs when this node only takes requests (``serve --queue``): jobs go to
        Redis, workers elsewhere check them against the model and run them; no model is loaded here."""
        self.store, self.out_dir, self.limits = store, out_dir, limits
        # provenance, the server's to decide (not the client's): every image watermarked, every record signed
        self.watermark, self.sign_key = watermark, sign_key
        # names in requests (LoRAs, ControlNets, IP-Adapters, embeddings, upscalers) resolve inside the models
        # folder only, unless the server was started to take paths too
        self.allow_paths = allow_paths
        self.merge_lock = threading.Lock()
        self.remote = queue is not None
        # heavy work that is no generation (an upscale, a preprocessor's preview) runs here, queued one at a time
        jobs = JobStore(out_dir / "jobs.sqlite" if out_dir is not None and not self.remote else None,
                        limits.max_kept_bytes)
        self.local = JobQueue(self.run, jobs, max_queue=max_queue, cancelled_error=g.Cancelled)
        self.queue = queue if self.remote else self.local
        self.options: dict[str, Any] = dict(A1111_OPTIONS)

    # -- building jobs
    def make_job(self, request: dict[str, Any] | JobRequest, kind: str, *, save: bool = True, job_id: str | None = None,
                 created: float | None = None) -> Job:
        """Check a request (our job API's fields, as a dict) against the model and the limits and decode its
        images: a Job ready to queue. Raises RequestError naming what is wrong. Runs model loading and image
        decoding: call it off the event loop."""
        request = checked_fields(request, kind)  # every door's request passes the job API's bounds
        try:
            entry = self.store.lookup(request.get("model"))
            vae = self.store.vae(request.get("vae"))
            self.store.modules(request.get("text_encoders"))
        except KeyError as err:
            raise RequestError(err.args[0], 404) from None
        lim = self.limits
        seed = request.get("seed")
        if seed is None or seed == -1:
            seed = secrets.randbelow(2**31)
        try:
            given = {k: request[k] for k in SETTINGS_FIELDS if request.get(k) is not None}
            settings = Settings(**{**given, "seed": seed, "watermark": self.watermark}).with_model_defaults(
                entry.spec, request.get("steps"), request.get("sampler"), request.get("cfg_scale"))
        except TypeError as err:
            raise RequestError(str(err)) from None
        if settings.steps > lim.max_steps:
            raise RequestError(f"steps {settings.steps} is over the limit max_steps={lim.max_steps}")
        if settings.hires_scale > 1 and (settings.hires_steps or settings.steps) > lim.max_steps:
            raise RequestError(f"hires_steps {settings.hires_steps} (the second pass's steps) is over the limit "
                               f"max_steps={lim.max_steps}")
        if request["n"] > lim.max_batch:
            raise RequestError(f"n={request['n']} images per request is over the limit max_batch={lim.max_batch}")
        try:
            settings.validate()
        except ValueError as err:
            raise RequestError(str(err)) from None
        init = mask = None
        if kind in ("img2img", "inpaint", "edit"):
            if not request.get("init_image"):
                raise RequestError(f"{kind} needs an init image")
            init = decode_image(request["init_image"], "the init image", lim)
        if kind == "inpaint" and request.get("mask"):
            mask = decode_image(request["mask"], "the mask", lim)
        elif kind == "inpaint" and not any(settings.outpaint):
            raise RequestError("inpaint needs a mask (white = regenerate, black = keep), or outpainting borders "
                               "(outpaint_left, outpaint_right, outpaint_up, outpaint_down)")
        w, h = settings.width or entry.spec.image_size, settings.height or entry.spec.image_size
        if w * h > lim.max_pixels:  # the server's limit first: it is what this client can change
            raise RequestError(f"width x height = {w}x{h} is {w * h} pixels, over the limit max_pixels="
                               f"{lim.max_pixels}")
        if self.remote:  # the worker that runs it checks the rest against the loaded model
            return self._remote_job(kind, request, settings, entry, init, save, job_id, created)
        try:
            model, _ = self.store.get(entry.name, vae, request.get("text_encoders"))
        except ValueError as err:  # a part the model does not take, a file that is no part of it
            raise RequestError(str(err)) from None
        refiner = None
        if settings.refiner:  # A1111's refiner: one of the served models, by name or A1111's title
            try:
                refined = self.store.lookup(settings.refiner)
                refiner = self.store.get(refined.name)
            except KeyError as err:
                raise RequestError(f"refiner: {err.args[0]}", 404) from None
            except ValueError as err:
                raise RequestError(f"refiner: {err}") from None
            settings = replace(settings, refiner=refined.name)
        controls = self._control_units(request.get("controls") or [], init)
        prompts = self._image_prompt_units(request.get("image_prompts") or [])
        try:
            loras = tuple((lo["name"], lo.get("weight", 1.0)) for lo in request.get("loras") or [])
            checked = Request(kind, settings, init_image=init, mask=mask, loras=loras,
                              models_dir=self.store.models_dir, lora_strict=request.get("lora_strict", True),
                              controls=controls, image_prompts=prompts, confined=not self.allow_paths,
                              sign_key=self.sign_key, refiner=refiner).check(model)
        except (ValueError, OSError) as err:  # a name that is no model, a folder that is not one
            raise RequestError(str(err)) from None
        w, h = g.output_size(model, checked.settings)
        if checked.settings.hires_scale > 1:  # the limit is on what is made: the second pass's size
            w, h = hires_size(model, checked.settings)
        if w * h > lim.max_pixels:
            raise RequestError(f"{w}x{h} is {w * h} pixels, over the limit max_pixels={lim.max_pixels}")
        record = {k: v for k, v in request.items() if k not in ("init_image", "mask", "controls", "image_prompts")}
        for key in ("controls", "image_prompts"):  # the units without their images (each PNG stores them)
            if request.get(key):
                record[key] = [{k: v for k, v in unit.items() if k != "image"} for unit in request[key]]
        job = Job(kind=kind, request={**record, "seed": seed}, model=entry.name, inputs={"request": checked},
                  save=save, warnings=list(checked.warnings))
        if job_id is not None:
            job.id = job_id
        if created is not None:
            job.created = created
        return job

    def _remote_job(self, kind: str, request: dict[str, Any], settings: Settings, entry, init, save: bool,
                    job_id: str | None, created: float | None) -> Job:
        """An API node's job (``serve --queue``): checked here against the limits and what the model's spec
        says (its size, the hires pass's, every image and unit decodable); the worker checks it against the
        loaded model (a LoRA, a ControlNet it cannot find fails the job there, as a bad request)."""
        if settings.refiner:
            try:
                settings = replace(settings, refiner=self.store.lookup(settings.refiner).name)
            except KeyError as err:
                raise RequestError(f"refiner: {err.args[0]}", 404) from None
        self._control_units(request.get("controls") or [], init)  # each image decodes, each unit is valid
        self._image_prompt_units(request.get("image_prompts") or [])
        w, h = settings.width or entry.spec.image_size, settings.height or entry.spec.image_size
        if settings.hires_scale > 1:
            w, h = round(w * settings.hires_scale), round(h * settings.hires_scale)
        if w * h > self.limits.max_pixels:
            raise RequestError(f"{w}x{h} is {w * h} pixels, over the limit max_pixels={self.limits.max_pixels}")
        record = {k: v for k, v in request.items() if k not in ("init_image", "mask", "controls", "image_prompts")}
        for key in ("controls", "image_prompts"):
            if request.get(key):
                record[key] = [{k: v for k, v in unit.items() if k != "image"} for unit in request[key]]
        job = Job(kind=kind, request={**record, "seed": settings.seed}, model=entry.name, save=save)
        if job_id is not None:
            job.id = job_id
        if created is not None:
            job.created = created
        return job

    def _control_units(self, units: list[dict[str, Any]], init: Image.Image | None) -> tuple:
        """The request's control units, each image decoded and checked (a unit without one reads the init
        image, as A1111's extension does); a bad unit is refused naming its index and field."""
        out = []
        for i, unit in enumerate(units):
            image = init
            if unit.get("image"):
                image = decode_image(unit["image"], f"controls[{i}].image", self.limits)
            if image is None:
                raise RequestError(f"controls[{i}].image is missing: give the image its preprocessor reads")
            fields = {k: v for k, v in unit.items() if k != "image" and v is not None}
            try:
                out.append(ControlUnit(image=image, **fields).check())
            except (TypeError, ValueError) as err:
                raise RequestError(f"controls[{i}]: {err}") from None
        return tuple(out)

    def _image_prompt_units(self, units: list[dict[str, Any]]) -> tuple:
        """The request's image prompts, each image decoded and checked; a bad one is refused naming its index."""
        out = []
        for i, unit in enumerate(units):
            if not unit.get("image"):
                raise RequestError(f"image_prompts[{i}].image is missing: give the reference image")
            image = decode_image(unit["image"], f"image_prompts[{i}].image", self.limits)
            fields = {k: v for k, v in unit.items() if k != "image" and v is not None}
            try:
                out.append(ImagePromptUnit(image=image, **fields).check())
            except (TypeError, ValueError) as err:
                raise RequestError(f"image_prompts[{i}]: {err}") from None
        return tuple(out)

    def submit(self, request: dict[str, Any] | JobRequest, kind: str, *, save: bool = True) -> Job:
        """make_job, then queue it; the request is kept as received until the job starts."""
        if isinstance(request, JobRequest):
            request = request.model_dump(exclude_defaults=True)  # the payload kept for a restart, as a client sends
        job = self.make_job(request, kind, save=save)
        return self.queue.submit(job, {**request, "seed": job.request["seed"]})  # a restart keeps the seed drawn

    def recover(self) -> None:
        """At start-up, from the job store: a job that was running when the last process died is marked
        failed with the reason; queued jobs are queued again, in their order (or failed with the reason
        their request no longer passes, e.g. a model no longer served). With a Redis queue, Redis keeps them."""
        if self.remote:
            return
        self.queue.store.fail_interrupted()
        for row in self.queue.store.queued():
            payload = row["payload"] or {}
            if row["kind"] in ("upscale", "detect"):  # answered in the request that asked, which a restart ended
                job = Job(kind=row["kind"], request={}, model=row["model"], id=row["id"], created=row["created"])
                job.update(status="failed", finished=time.time(), error=f"the server stopped before this "
                           f"{row['kind']} ran; its request was answered with an error: ask again")
                self.queue.store.finished(job)
                continue
            try:
                job = self.make_job(payload, row["kind"], save=row["save"], job_id=row["id"], created=row["created"])
            except (RequestError, KeyError) as err:
                job = Job(kind=row["kind"], request={}, model=row["model"], id=row["id"], created=row["created"])
                job.update(status="failed", finished=time.time(), bad_request=True,
                           error=f"queued before a restart, then refused: {err}")
                self.queue.store.finished(job)
                continue
            self.queue.submit(job, payload, restored=True)

    def run_queued(self, kind: str, label: str, request: dict[str, Any], work: Callable[[Job], None]) -> Job:
        """Heavy work that is not a generation (an upscale, a preprocessor) queued like one, so the queue's
        bound holds for every request: ``work(job)`` runs on the worker; this waits for it (call it off the
        event loop) and raises RequestError when it failed."""
        job = Job(kind=kind, request=request, model=label, inputs={"work": work}, save=False)
        self.local.submit(job, {})
        while not job.done:
            time.sleep(0.02)
        if job.status != "done":
            raise RequestError(f"the {kind} {job.status}: {job.error or 'cancelled'}", 422 if job.bad_request else 500)
        return job

    # -- running them (the worker thread)
    def run(self, job: Job) -> None:
        if "work" in job.inputs:  # queued work of another kind (an upscale): it runs itself
            return job.inputs["work"](job)
        model, encoder = self.store.get(job.model, job.request.get("vae"), job.request.get("text_encoders"))
        request: Request = job.inputs["request"]
        every = 1

        def progress(info: dict) -> None:
            nonlocal every
            i, total = info["i"] + 1, info["total"]
            every = max(1, total // 8)
            changes: dict[str, Any] = {"step": i, "total": total, "progress": min(0.99, i / total)}
            if job.request.get("previews", True) and (i % every == 0 or i == total):
                changes["preview"] = self._preview(model, info["denoised"][:1])
            job.update(**changes)

        request = replace(request, extra={"server": {"job": job.id},
                                          **({} if request.lora_strict else {"lora_strict": False})})
        results = run(request, model, encoder, callback=progress, cancel=job.cancel_event.is_set)
        paths = save(results, self.out_dir) if self.out_dir is not None and job.save else [None] * len(results)
        job.update(images=[ImageResult(r.png(), r.seed, r.parameters, r.record, None if p is None else str(p))
                           for r, p in zip(results, paths, strict=True)])

    @staticmethod
    def _preview(model, denoised: torch.Tensor) -> bytes:
        if model.vae is not None:
            denoised = model.vae.decode(model.vae.from_latent(denoised.to(module_device(model.vae))))
        return preview_png(to_uint8(denoised.float().cpu().clamp(-1, 1))[0])


def upscale_pictures(service: Service, pictures: list[Image.Image], *, scale: float, size: tuple[int, int] | None,
                     crop: bool, upscaler: str, second: tuple[str, float] | None, prompt: str, seed: int,
                     noise_level: int | None, names: list[str] | None = None, tile: int | None = None) -> list:
    """Extras: each picture upscaled (pipelines/upscale.py) and, when the server saves images, written under
    OUT/extras/. Everything is checked first (sizes against the limits: an SR stage's output against
    max_pixels, as generation's, a resampler's against max_input_pixels; the count against max_batch), then the
    work waits its turn in the job queue like any generation (a full queue answers 429), and this returns
    when it is done."""
    lim = service.limits
    if len(pictures) > lim.max_batch:
        raise RequestError(f"{len(pictures)} pictures per request is over the limit max_batch={lim.max_batch}")
    try:
        confined = not service.allow_paths
        first = resolve_upscaler(upscaler, service.store.models_dir, confined=confined)
        other = (resolve_upscaler(second[0], service.store.models_dir, confined=confined), float(second[1])) \
            if second else None
        settings = Settings(prompt=prompt, seed=seed, sr_noise_level=noise_level, tile=tile).validate()
    except ValueError as err:
        raise RequestError(str(err)) from None
    sr = any(u.kind == "sr" for u in [first] + ([other[0]] if other else []))
    for i, picture in enumerate(pictures):
        if size is None and (not isinstance(scale, (int, float)) or not 1 <= scale <= 16):
            raise RequestError(f"the upscale factor must lie in [1, 16], got {scale!r}")
        factor = max(size[0] / picture.width, size[1] / picture.height) if size is not None else scale
        w, h = round(picture.width * factor), round(picture.height * factor)
        if sr:  # a diffusion model at the output size: per pixel it costs what generation does
            made = min(w, tile) * min(h, tile) if tile else w * h
            if made > lim.max_pixels:
                raise RequestError(f"picture {i} would become {w}x{h}: an SR stage samples {made} pixels at once, "
                                   f"over the limit max_pixels={lim.max_pixels}" + ("" if tile else
                                   "; sample it in tiles (tile) or upscale less"), 413)
        if w * h > lim.max_input_pixels:
            raise RequestError(f"picture {i} would become {w}x{h}, over the limit max_input_pixels="
                               f"{lim.max_input_pixels}", 413)
    inputs = [{"name": n} for n in names] if names else None
    done: list = []

    def work(job: Job) -> None:
        def progress(info: dict) -> None:
            i, total = info.get("i", 0) + 1, info.get("total", 1)
            job.update(step=i, total=total, progress=min(0.99, i / max(total, 1)))

        results = run_upscale(pictures, scale, first, settings, None, inputs, size=size, crop=crop, second=other,
                              callback=progress, cancel=job.cancel_event.is_set, device=service.store.device)
        if service.out_dir is not None:
            save(results, service.out_dir / "extras")
        done.extend(results)
        job.update(images=[ImageResult(r.png(), r.seed, r.parameters, r.record) for r in results])

    service.run_queued("upscale", first.name, {"upscaler": upscaler, "scale": scale, "size": size,
                                               "pictures": len(pictures)}, work)
    return done
