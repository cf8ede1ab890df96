"""AUTOMATIC1111-compatible endpoints (/sdapi/v1): request and response JSON as stable-diffusion-webui's
modules/api/api.py shapes them, so existing clients and scripts work unchanged. Generation goes through
the same queue as the job API (a full queue answers 429); the call returns when the images are done."""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from imagine import __version__
from imagine.a1111 import (
    A1111_NAMES,
    CONTROL_MODE_INDEX,
    HIRES_SAME,
    NO_EFFECT,
    OVERRIDES,
    RESIZE_NAMES,
    SCHEDULERS,
    UNIT_FIELDS,
    UNSUPPORTED,
    a1111_name,
    parse_a1111,
)
from imagine.adapters import image_prompt
from imagine.adapters.control import available, module_name
from imagine.adapters.embeddings import listing
from imagine.data.conditions import PREPROCESSORS, detect
from imagine.data.transforms import RESIZE_MODES  # A1111's resize_mode 0..3, in order
from imagine.io import provenance
from imagine.io.models_dir import entries
from imagine.pipelines.settings import INPAINT_FILLS  # A1111's inpainting_fill 0..3, in order
from imagine.pipelines.upscale import RESAMPLERS, upscaler_names
from imagine.samplers import SAMPLERS, resolve
from imagine.server.jobs import Job
from imagine.server.models import AUTOMATIC
from imagine.server.schemas import (
    MAX_PROCESSOR_RES,
    A1111ExtrasBatch,
    A1111ExtrasBatchResponse,
    A1111ExtrasSingle,
    A1111ExtrasSingleResponse,
    A1111ImageResponse,
    A1111Img2Img,
    A1111Txt2Img,
    JobRequest,
    PngInfoRequest,
    PngInfoResponse,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
)
from imagine.server.service import (
    RequestError,
    Service,
    checked_fields,
    decode_image,
    png_base64,
    typed_request,
    upscale_pictures,
)


def _scheduler(value: str | None) -> str | None:
    if value is None:
        return None
    for name, (label, ours, _) in SCHEDULERS.items():
        if value.strip().lower() in (name, label.lower()):
            return ours
    raise RequestError(f"scheduler {value!r} unknown; choose one of: "
                       f"{', '.join(label for label, _, _ in SCHEDULERS.values())}")





def _check_fields(body: A1111Txt2Img, sampler: str) -> list[str]:
    """Refuse what would change results and is not implemented; return warnings for unknown fields."""
    extra = dict(body.model_extra or {})
    refused, warnings = [], []
    if body.styles:
        refused.append(f"styles={json.dumps(body.styles)[:40]} (this server defines no styles)")
    for name, value in extra.items():
        if name in UNSUPPORTED:
            harmless, what = UNSUPPORTED[name]
            if value not in harmless:
                refused.append(f"{name}={json.dumps(value)[:40]} ({what})")
        elif name == "eta":
            stochastic = SAMPLERS[resolve(sampler)[0]].stochastic
            value = _number(extra, "eta", float)
            if value is not None and stochastic and float(value) != 1.0:
                refused.append(f"eta={value} (this server's stochastic samplers run at eta 1)")
            elif value is not None and resolve(sampler)[0] == "ddim" and float(value) != 0.0:
                refused.append(f"eta={value} (DDIM runs at eta 0 here)")
        elif name in ("mask_blur_x", "mask_blur_y"):
            if value is not None and value != getattr(body, "mask_blur", value):
                refused.append(f"{name}={value} (a mask blur other than mask_blur={getattr(body, 'mask_blur', 4)}:"
                               " one radius for both axes)")
        elif name == "script_name":
            if value not in (None, "") and str(value).strip().lower() not in SCRIPTS:
                refused.append(f"script_name={json.dumps(value)[:40]} (this server runs "
                               f"{', '.join(repr(s) for s in SCRIPTS.values())} only)")
        elif name == "alwayson_scripts":
            if value is not None and not isinstance(value, dict):
                refused.append("alwayson_scripts (an object of scripts by name)")
            for script in (value or {}):
                if script.lower() != "controlnet":
                    refused.append(f"alwayson_scripts.{script} (this server runs the ControlNet extension's "
                                   "units only)")
        elif name not in NO_EFFECT:
            warnings.append(f"unknown field {name!r} ignored")
    if refused:
        raise RequestError("not supported by this server, so refused rather than ignored: " + "; ".join(refused)
                           + ". Leave them out or at their defaults.")
    return warnings





# A1111's scripts (script_name, case aside) that this server runs, by their titles
SCRIPTS = {"poor man's outpainting": "Poor man's outpainting"}
_DIRECTIONS = ("left", "right", "up", "down")


def refiner_request(body: A1111Txt2Img) -> dict[str, Any]:
    """A1111's refiner_checkpoint (a model's name or title; "None": none) and refiner_switch_at, as the request's
    refiner and its switch."""
    extra = body.model_extra or {}
    name = extra.get("refiner_checkpoint")
    if name in (None, "", "None"):
        return {}
    if not isinstance(name, str):
        raise RequestError("refiner_checkpoint is a model's name or title from /sdapi/v1/sd-models")
    switch = _number(extra, "refiner_switch_at", float)
    return {"refiner": name, "refiner_switch_at": 0.8 if switch is None else switch}


def outpaint_script(body: A1111Txt2Img) -> dict[str, Any] | None:
    """A1111's "Poor man's outpainting" script (img2img): script_args [pixels, mask_blur, inpainting_fill,
    directions] as the request's outpainting borders, mask blur and masked content; None without it."""
    extra = body.model_extra or {}
    name = str(extra.get("script_name") or "").strip().lower()
    if name != "poor man's outpainting":
        return None
    args = extra.get("script_args") or []
    if not isinstance(args, list) or len(args) < 1:
        raise RequestError("Poor man's outpainting takes script_args [pixels, mask_blur, inpainting_fill, "
                           "directions], e.g. [128, 4, 1, [\"left\", \"right\"]]")
    args = [*args, *[None] * 4][:4]
    pixels, blur, fill, directions = args
    pixels = _number({"pixels": pixels}, "pixels", int)
    blur = 4 if blur is None else _number({"mask_blur": blur}, "mask_blur", int)
    fill = 1 if fill is None else _number({"inpainting_fill": fill}, "inpainting_fill", int)
    if directions is None:
        directions = list(_DIRECTIONS)
    if not isinstance(directions, list) or any(str(d).lower() not in _DIRECTIONS for d in directions):
        raise RequestError(f"Poor man's outpainting's directions are a list of {', '.join(_DIRECTIONS)}; got "
                           f"{json.dumps(directions)[:60]}")
    if pixels is None or pixels < 1 or not directions:
        raise RequestError("Poor man's outpainting needs pixels >= 1 and at least one direction")
    if fill not in range(len(INPAINT_FILLS)):
        raise RequestError(f"inpainting_fill {fill} unknown: 0 fill, 1 original, 2 latent noise, 3 latent nothing")
    asked = {str(d).lower() for d in directions}
    return {"mask_blur": blur, "inpaint_fill": INPAINT_FILLS[fill],
            **{f"outpaint_{side}": pixels if side in asked else 0 for side in _DIRECTIONS}}


def provenance_items(image: Image.Image, parameters: str | None) -> dict[str, str]:
    """What imagine info says of an image's provenance, as PNG info items: the invisible watermark, and the
    signature when the record carries one (checked against the key in it)."""
    pixels = np.asarray(image)
    items = {}
    if provenance.can_watermark(image.width, image.height):  # smaller images carry none: A1111's empty items
        items["imagine_watermark"] = provenance.describe_watermark(pixels)
    try:
        record = json.loads(image.info["imagine"]) if isinstance(image.info.get("imagine"), str) else None
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict) and record.get("signature"):
        items["imagine_signature"] = provenance.verify(pixels, parameters, record)[1]
    return items


def is_ip_module(module: Any) -> bool:
    """sd-webui-controlnet's IP-Adapter preprocessors: ip-adapter_clip_sd15, ip-adapter-auto, ..."""
    return str(module or "").lower().replace("_", "-").startswith("ip-adapter")


def a1111_controls(script: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """alwayson_scripts.controlnet.args (sd-webui-controlnet's units) as our job API's controls and image
    prompts (units whose module is an ip-adapter one); a field that would change results and that we do
    not implement is refused, naming it."""
    args = script.get("args") if isinstance(script, dict) else script
    if not isinstance(args, list):
        raise RequestError("alwayson_scripts.controlnet.args must be a list of units")
    out, prompts = [], []
    for i, unit in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(unit, dict):
            raise RequestError(f"{where} must be an object (a ControlNet unit)")
        if not unit.get("enabled", True):
            continue
        unknown = sorted(set(unit) - UNIT_FIELDS)
        if unknown:
            raise RequestError(f"{where}: unknown fields {unknown}")
        for field, harmless in (("mask", (None, "")), ("effective_region_mask", (None, "")),
                                ("input_mode", (None, "simple", 0)), ("batch_images", (None, "", [])),
                                ("loopback", (None, False))):
            if unit.get(field) not in harmless:
                raise RequestError(f"{where}.{field} is not supported by this server (per-unit masks, batch and "
                                   "loopback modes); leave it out")
        image = unit.get("image") if unit.get("image") is not None else unit.get("input_image")
        if isinstance(image, dict):  # newer clients: {"image": b64, "mask": b64}
            if image.get("mask"):
                raise RequestError(f"{where}.image.mask is not supported by this server (per-unit masks)")
            image = image.get("image")
        model = unit.get("model")
        model = None if model in (None, "", "None", "none") else str(model).split(" [")[0]
        if is_ip_module(unit.get("module")):  # an IP-Adapter unit: an image prompt
            if not image:
                raise RequestError(f"{where}.image is missing: an IP-Adapter unit needs its reference image")
            try:
                prompts.append({"image": image, "model": model, "scale": float(unit.get("weight", 1.0)),
                                "start": float(unit.get("guidance_start", 0.0)),
                                "end": float(unit.get("guidance_end", 1.0))})
            except (TypeError, ValueError) as err:
                raise RequestError(f"{where}: {err}") from None
            continue
        mode = unit.get("control_mode", 0)
        if unit.get("guess_mode"):
            mode = 2
        mode = CONTROL_MODE_INDEX.get(mode, mode) if isinstance(mode, int) else mode
        resize = unit.get("resize_mode", "Crop and Resize")
        try:
            resize = RESIZE_NAMES.get(str(resize).lower(), resize)
            entry = {"image": image, "module": module_name(str(unit.get("module") or "none")), "model": model,
                     "weight": float(unit.get("weight", 1.0)), "start": float(unit.get("guidance_start", 0.0)),
                     "end": float(unit.get("guidance_end", 1.0)), "mode": mode, "resize_mode": resize,
                     "pixel_perfect": bool(unit.get("pixel_perfect", False))}
        except (TypeError, ValueError) as err:
            raise RequestError(f"{where}: {err}") from None
        for name in ("processor_res", "threshold_a", "threshold_b"):  # -1: the preprocessor's default
            value = unit.get(name)
            if value is not None and value != -1:
                try:
                    entry[name] = int(value) if name == "processor_res" else float(value)
                except (TypeError, ValueError):
                    raise RequestError(f"{where}.{name} must be a number") from None
        out.append(entry)
    return out, prompts





def hires_request(body: A1111Txt2Img) -> dict[str, Any]:
    """A1111's hires fix fields (enable_hr, hr_scale or hr_resize_x/y, hr_upscaler, denoising_strength,
    hr_second_pass_steps) as our job API's; a second pass with another checkpoint, sampler or prompt is refused."""
    extra = dict(body.model_extra or {})
    if not extra.get("enable_hr"):
        return {}
    different = [f"{k}={json.dumps(extra[k])[:40]}" for k, same in HIRES_SAME.items()
                 if k in extra and extra[k] not in same and not (k == "hr_prompt" and extra[k] == body.prompt)
                 and not (k == "hr_negative_prompt" and extra[k] == body.negative_prompt)]
    if different:
        raise RequestError("hires fix here runs its second pass with the first pass's checkpoint, sampler and "
                           "prompts; refused rather than ignored: " + "; ".join(different))
    scale = _number(extra, "hr_scale", float) or 2.0
    rx, ry = _number(extra, "hr_resize_x", int) or 0, _number(extra, "hr_resize_y", int) or 0
    if rx or ry:  # A1111: a target size instead of a scale (one side 0: kept in proportion)
        width, height = body.width or 512, body.height or 512
        scale = max(rx / width if rx else 0, ry / height if ry else 0)
    strength = body.denoising_strength if body.denoising_strength is not None else 0.7
    steps = _number(extra, "hr_second_pass_steps", int) or None  # A1111's 0: as many as the first pass
    return {"hires_scale": scale, "hires_upscaler": extra.get("hr_upscaler") or "Latent",
            "hires_strength": strength, "hires_steps": steps}


def _number(fields: dict[str, Any], name: str, kind: type) -> float | int | None:
    """An A1111 field that is not in the typed body, checked: a finite number (an integer for ``int``) or
    None; anything else is a 422 naming it."""
    value = fields.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (kind is int and value != int(value)):
        raise RequestError(f"{name} must be {'an integer' if kind is int else 'a number'}, got "
                           f"{json.dumps(value)[:40]}")
    return kind(value)


def router(service: Service) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 compatible"])

    def job_request(body: A1111Txt2Img, kind: str) -> tuple[JobRequest, list[str]]:
        """An A1111 payload translated into the one typed request (its fields refused or warned about)."""
        sampler = body.sampler_name or body.sampler_index or "DPM++ 2M"
        try:
            resolve(sampler)
        except ValueError as err:
            raise RequestError(str(err)) from None
        warnings = _check_fields(body, sampler)
        override = dict(body.override_settings or {})
        unknown = sorted(set(override) - set(OVERRIDES))
        if unknown:
            raise RequestError(f"override_settings {unknown} are not supported here; supported: {list(OVERRIDES)}")
        options = {**service.options, **override}
        if not isinstance(options["forge_additional_modules"] or [], list):
            raise RequestError("forge_additional_modules is a list of file names from /sdapi/v1/sd-modules")
        if str(options["samples_format"]).lower() != "png":
            raise RequestError(f"samples_format {options['samples_format']!r} is not supported: imagine writes PNG, "
                               "which carries the parameters that reproduce each image")
        try:
            clip_skip, ensd = int(options["CLIP_stop_at_last_layers"]), int(options["eta_noise_seed_delta"])
            tile = int(override.get("imagine_tile") or 0) or None  # 0: whole images
            vae_tile = int(override.get("imagine_vae_tile") or 0) or None  # 0: whole, or as the plan picks
        except (TypeError, ValueError):
            raise RequestError("CLIP_stop_at_last_layers, eta_noise_seed_delta, imagine_tile and imagine_vae_tile "
                               "must be integers") from None
        request = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "steps": body.steps,
                   "sampler": sampler, "schedule": _scheduler(body.scheduler), "cfg_scale": body.cfg_scale,
                   "distilled_cfg_scale": body.distilled_cfg_scale,
                   **({"resolution_binning": body.resolution_binning} if kind == "txt2img" else {}),
                   "seed": body.seed, "n": body.batch_size * body.n_iter, "width": body.width,
                   "height": body.height, "model": override.get("sd_model_checkpoint"), "previews": True,
                   "vae": None if options["sd_vae"] in AUTOMATIC else options["sd_vae"],
                   "text_encoders": list(options["forge_additional_modules"] or []) or None,
                   **({"inpainting_mask_weight": options["inpainting_mask_weight"]} if kind != "txt2img" else {}),
                   "clip_skip": clip_skip if clip_skip > 1 else None, "noise_seed_delta": ensd,
                   "backend": override.get("imagine_backend", "torch"), "tile": tile, "vae_tile": vae_tile}
        request.update(refiner_request(body))
        if kind == "txt2img":
            request.update(hires_request(body))
        if kind != "txt2img":
            request["strength"] = body.denoising_strength if body.denoising_strength is not None else 0.75
            request["init_image"] = body.init_images[0]
            request["resize_mode"] = RESIZE_MODES[body.resize_mode]
            if body.image_cfg_scale is not None and body.mask is None:  # instruct models' (img2img only)
                request["image_cfg_scale"] = body.image_cfg_scale
            if len(body.init_images) > 1:
                warnings.append(f"init_images has {len(body.init_images)} images; the first is used")
        scripts = {k.lower(): v for k, v in ((body.model_extra or {}).get("alwayson_scripts") or {}).items()}
        if scripts.get("controlnet"):
            request["controls"], request["image_prompts"] = a1111_controls(scripts["controlnet"])
        if kind == "inpaint":
            request.update(mask=body.mask, mask_blur=body.mask_blur, inpaint_fill=INPAINT_FILLS[body.inpainting_fill],
                           inpaint_only_masked=body.inpaint_full_res, inpaint_padding=body.inpaint_full_res_padding,
                           mask_invert=bool(body.inpainting_mask_invert))
            request.update(outpaint_script(body) or {})  # the script's borders, blur and fill
        return typed_request(request, kind), warnings

    async def submit(body: A1111Txt2Img, kind: str) -> tuple[Job, list[str]]:
        """Build and queue the job off the event loop: decoding a large image and loading a model on first
        use take seconds, during which other requests and event streams must go on."""
        request, warnings = job_request(body, kind)
        job = await run_in_threadpool(service.submit, request, kind, save=body.save_images)
        while not job.done:
            await asyncio.sleep(0.02)
            if service.remote:  # a snapshot: read again from Redis
                job = await run_in_threadpool(service.queue.get, job.id) or job
        if job.status == "failed":
            raise RequestError(f"generation failed: {job.error}", 422 if job.bad_request else 500)
        return job, [*warnings, *job.warnings]

    def info(job: Job, body: A1111Txt2Img) -> str:
        req, entry = job.request, service.store.lookup(job.model)
        images = job.images
        first = images[0].record["settings"] if images else {}
        name, implied = resolve(req["sampler"] or entry.spec.default_sampler)
        schedule = req.get("schedule") or implied
        n = req["n"]
        seeds = [req["seed"] + i for i in range(n)]
        width = first.get("width") or req.get("width") or entry.spec.image_size
        height = first.get("height") or req.get("height") or entry.spec.image_size
        out = {
            "prompt": req["prompt"], "all_prompts": [req["prompt"]] * n,
            "negative_prompt": req["negative_prompt"], "all_negative_prompts": [req["negative_prompt"]] * n,
            "seed": req["seed"], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
            "width": width, "height": height, "sampler_name": a1111_name(name),
            "cfg_scale": first.get("cfg_scale", req["cfg_scale"]), "steps": first.get("steps", req["steps"]),
            "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": entry.name, "sd_model_hash": entry.short_hash, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": req.get("strength") if job.kind != "txt2img" else (
                req.get("hires_strength") if (req.get("hires_scale") or 1) > 1 else None),
            "extra_generation_params": {"Schedule type": "Karras" if schedule == "karras" else "Automatic"},
            "index_of_first_image": 0, "infotext": images[0].parameters if images else "",
            "infotexts": [im.parameters for im in images], "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            "clip_skip": req.get("clip_skip") or 1,
            "is_using_inpainting_conditioning": entry.spec.conditioning_channels == 5,
            "version": f"imagine {__version__}", "interrupted": job.status == "cancelled",
        }
        return json.dumps(out)

    def response(job: Job, body: A1111Txt2Img, echo: dict[str, Any], warnings: list[str]) -> A1111ImageResponse:
        images = [png_base64(im.png) for im in job.images] if body.send_images else []
        return A1111ImageResponse(images=images, parameters=echo, info=info(job, body), warnings=warnings)

    @api.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        """A1111's upscaler list: "None", the resamplers, the shipped SR stage and the models folder's SR/."""
        out = [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]
        for name in upscaler_names(service.store.models_dir):
            kind = "resampler" if name in RESAMPLERS else "super-resolution diffusion"
            out.append({"name": name, "model_name": kind, "model_path": None, "model_url": None, "scale": 4})
        return out

    @api.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": "Latent"}]

    def extras(body, pictures: list, names: list[str] | None = None) -> list:
        if body.gfpgan_visibility or body.codeformer_visibility:
            raise RequestError("face restoration (GFPGAN, CodeFormer) needs their weights, which this server does "
                               "not have: leave gfpgan_visibility and codeformer_visibility at 0")
        if body.upscaler_1 in (None, "", "None"):
            raise RequestError("upscaler_1 is None: name one from GET /sdapi/v1/upscalers")
        extra = set(body.model_extra or {}) - {"upscaling_resize_w_h", "upscale_first"}
        if extra:
            raise RequestError(f"unknown Extras fields {sorted(extra)}: refused rather than ignored")
        second = (body.upscaler_2, body.extras_upscaler_2_visibility) if body.upscaler_2 not in (None, "", "None") \
            and body.extras_upscaler_2_visibility > 0 else None
        size = (body.upscaling_resize_w, body.upscaling_resize_h) if body.resize_mode == 1 else None
        return upscale_pictures(service, pictures, scale=body.upscaling_resize, size=size, crop=body.upscaling_crop,
                                upscaler=body.upscaler_1, second=second, prompt=body.prompt, seed=body.seed,
                                noise_level=None, names=names)

    @api.post("/extra-single-image", response_model=A1111ExtrasSingleResponse)
    def extra_single_image(body: A1111ExtrasSingle) -> A1111ExtrasSingleResponse:
        """A1111's Extras on one picture: upscaled by upscaling_resize (resize_mode 0) or to upscaling_resize_w x
        h (resize_mode 1, cropped with upscaling_crop), with upscaler_1 and upscaler_2 blended at its visibility."""
        picture = decode_image(body.image, "the image", service.limits)
        result = extras(body, [picture])[0]
        return A1111ExtrasSingleResponse(html_info=f"<p>{result.parameters}</p>", image=png_base64(result.png()))

    @api.post("/extra-batch-images", response_model=A1111ExtrasBatchResponse)
    def extra_batch_images(body: A1111ExtrasBatch) -> A1111ExtrasBatchResponse:
        pictures = [decode_image(f.data, f"imageList[{i}]", service.limits) for i, f in enumerate(body.imageList)]
        results = extras(body, pictures, [f.name for f in body.imageList])
        return A1111ExtrasBatchResponse(html_info="".join(f"<p>{r.parameters}</p>" for r in results),
                                        images=[png_base64(r.png()) for r in results])

    @api.post("/txt2img", response_model=A1111ImageResponse)
    async def txt2img(body: A1111Txt2Img) -> A1111ImageResponse:
        job, warnings = await submit(body, "txt2img")
        return response(job, body, body.model_dump(), warnings)

    @api.post("/img2img", response_model=A1111ImageResponse)
    async def img2img(body: A1111Img2Img) -> A1111ImageResponse:
        """With a `mask`, inpainting (white = regenerate; black with inpainting_mask_invert = 1)."""
        job, warnings = await submit(body, "inpaint" if body.mask or outpaint_script(body) else "img2img")
        echo = body.model_dump()
        if not body.include_init_images:
            echo["init_images"], echo["mask"] = None, None
        return response(job, body, echo, warnings)

    @api.post("/png-info", response_model=PngInfoResponse)
    def png_info(body: PngInfoRequest) -> PngInfoResponse:
        image = decode_image(body.image, "the image", service.limits)
        items = {k: v for k, v in image.info.items() if isinstance(v, (str, int, float)) and k != "parameters"}
        text = image.info.get("parameters") if isinstance(image.info.get("parameters"), str) else None
        items.update(provenance_items(image, text))
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
        """Switch the model with {"sd_model_checkpoint": name or title}; other known options are stored. Every
        option is checked first, with the bounds of the request field it stands for (an option applies to every
        later request of every client), and nothing is changed unless all pass."""
        unknown = sorted(set(body) - set(service.options) - {"sd_model_checkpoint", "sd_checkpoint_hash"})
        if unknown:
            raise RequestError(f"options {unknown} are not supported here; supported: "
                               f"{sorted(['sd_model_checkpoint', *service.options])}", 400)
        try:
            if "sd_model_checkpoint" in body:
                service.store.lookup(str(body["sd_model_checkpoint"]))
            if "sd_vae" in body:
                service.store.vae(str(body["sd_vae"]))
            if "forge_additional_modules" in body:
                if not isinstance(body["forge_additional_modules"], list):
                    raise RequestError("forge_additional_modules is a list of file names from /sdapi/v1/sd-modules",
                                       400)
                service.store.modules(body["forge_additional_modules"])
        except KeyError as err:
            raise RequestError(err.args[0], 400) from None
        if "samples_format" in body and str(body["samples_format"]).lower() != "png":
            raise RequestError("samples_format: imagine writes PNG only (it carries the parameters that reproduce "
                               "each image)", 400)
        for key, field in (("CLIP_stop_at_last_layers", "clip_skip"), ("eta_noise_seed_delta", "noise_seed_delta")):
            if key in body:
                value = body[key]
                if not isinstance(value, int) or isinstance(value, bool):
                    raise RequestError(f"{key} must be an integer, got {json.dumps(value)[:40]}", 400)
                try:
                    checked_fields({field: value}, "txt2img")
                except RequestError as err:
                    raise RequestError(f"{key} (the request field {field}): {err}", 400) from None
        if "sd_model_checkpoint" in body:
            service.store.select(str(body["sd_model_checkpoint"]))
        service.options.update({k: v for k, v in body.items() if k in service.options})
        return None

    @api.get("/sd-models", response_model=list[SDModelItem])
    def sd_models() -> list[SDModelItem]:
        return [SDModelItem(title=e.title, model_name=e.name, hash=e.short_hash, sha256=e.sha256,
                            filename=str(e.path.resolve()), config=None) for e in service.store.entries()]

    @api.get("/loras")
    def loras() -> list[dict[str, Any]]:
        """The models folder's Lora/, as A1111 lists it; <lora:NAME:WEIGHT> in a prompt applies one."""
        return [{"name": e.name, "alias": e.name, "path": str(e.path.resolve()), "metadata": {}}
                for e in entries(service.store.models_dir, "lora")]

    @api.post("/refresh-loras")
    def refresh_loras() -> dict:
        """Lora/ is read on every request, so there is nothing to refresh; kept for A1111 clients."""
        return {}

    @api.get("/embeddings")
    def embeddings() -> dict[str, dict]:
        """The models folder's embeddings/, as A1111 lists them: those that fit the current model's text
        encoder are "loaded" (used where their name is written in a prompt), the others "skipped"."""
        if service.remote:  # this node loads no model: every file is listed, none checked against an encoder
            loaded, skipped = listing(service.store.models_dir, None)
        else:
            _, encoder = service.store.get(service.store.current)
            loaded, skipped = listing(service.store.models_dir, encoder)
        return {"loaded": loaded, "skipped": skipped}

    @api.post("/refresh-embeddings")
    def refresh_embeddings() -> dict:
        """embeddings/ is read on every request, so there is nothing to refresh; kept for A1111 clients."""
        return {}

    @api.get("/sd-modules")
    def sd_modules() -> list[dict[str, str]]:
        """Forge's list of separate text encoders and VAEs (forge_additional_modules takes their filenames)."""
        return [{"model_name": name, "filename": str(path.resolve())}
                for name, path in {**service.store.text_encoders, **service.store.vaes}.items()]

    @api.get("/sd-vae")
    def sd_vae() -> list[dict[str, str]]:
        """Separate VAEs (the models folder's VAE/), as A1111 lists them; "Automatic" is the model's own."""
        return [{"model_name": name, "filename": str(path.resolve())} for name, path in service.store.vaes.items()]

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


def controlnet_router(service: Service) -> APIRouter:
    """sd-webui-controlnet's own endpoints (/controlnet/...), so its clients list, preview and run units."""
    api = APIRouter(prefix="/controlnet", tags=["AUTOMATIC1111 ControlNet extension"])

    @api.get("/version")
    def version() -> dict[str, int]:
        return {"version": 2}

    @api.get("/model_list")
    def model_list() -> dict[str, list[str]]:
        """The models folder's ControlNet/ (ControlNets and T2I-Adapters) and the shipped ones, as "name [hash]"."""
        folder = service.store.models_dir
        titles = [title for title, _ in available(folder)]
        return {"model_list": titles + [t for t, _ in image_prompt.available(folder) if t not in titles]}

    @api.get("/module_list")
    def module_list(alias_names: bool = False) -> dict[str, Any]:
        detail = {}
        for name, pre in PREPROCESSORS.items():
            sliders = [{"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048}]
            for label in (pre.threshold_a, pre.threshold_b):
                if label is not None:
                    sliders.append({"name": label[0], "value": label[1]})
            detail[name] = {"model_free": name == "none", "sliders": sliders, "summary": pre.summary}
        ip = {"ip-adapter_clip": "the image's content through a CLIP vision encoder",
              "ip-adapter_shapes_clip": "the image's content through the shipped scorer's image tower",
              "ip-adapter_palette": "the image's colour palette (Composer)",
              "ip-adapter_intensity": "the image's luminance layout (Composer)"}
        for name, summary in ip.items():
            detail[name] = {"model_free": False, "sliders": [], "summary": summary}
        return {"module_list": [*PREPROCESSORS, *ip], "module_detail": detail}

    @api.post("/detect")
    def detect_endpoint(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        """Run a preprocessor: {"controlnet_module", "controlnet_input_images": [base64], "controlnet_processor_res",
        "controlnet_threshold_a", "controlnet_threshold_b"} -> {"images": [base64 PNG], "info"}."""
        images = body.get("controlnet_input_images")
        if not isinstance(images, list) or not images:
            raise RequestError("controlnet_input_images must be a non-empty list of base64 images")
        try:
            module = module_name(str(body.get("controlnet_module", "none")))
        except ValueError as err:
            raise RequestError(f"controlnet_module: {err}") from None
        res = _number(body, "controlnet_processor_res", int)  # -1: the image's own size
        res = None if res == -1 else res
        if res is not None and not 8 <= res <= MAX_PROCESSOR_RES:
            raise RequestError(f"controlnet_processor_res must be -1 (the image's own) or an integer in "
                               f"[8, {MAX_PROCESSOR_RES}], got {res}")
        args = {name: value for key, name in (("controlnet_threshold_a", "threshold_a"),
                                              ("controlnet_threshold_b", "threshold_b"))
                if (value := _number(body, key, float)) not in (None, -1)}
        if len(images) > service.limits.max_batch:
            raise RequestError(f"{len(images)} images per request is over the limit max_batch="
                               f"{service.limits.max_batch}")
        pictures = [decode_image(data, f"controlnet_input_images[{i}]", service.limits)
                    for i, data in enumerate(images)]
        out = []

        def work(job: Job) -> None:
            for image in pictures:
                try:
                    result = detect(module, image, res, **args)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"controlnet_module {module!r}: {err}") from None
                buffer = io.BytesIO()
                Image.fromarray(result).save(buffer, format="PNG")
                out.append(png_base64(buffer.getvalue()))

        service.run_queued("detect", module, {"module": module, "images": len(pictures)}, work)
        return {"images": out, "info": "Success"}

    return api
