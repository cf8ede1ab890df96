"""The FastAPI app: our job API under /api/v1, A1111's under /sdapi/v1, the web UI at /, docs at /docs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from imagine import __version__
from imagine.adapters.image_prompt import adapter_type, available
from imagine.io.checkpoint import CheckpointError
from imagine.io.ip_adapter_files import peek
from imagine.io.models_dir import SECTIONS, find
from imagine.pipelines.upscale import LATENT, upscaler_names
from imagine.server import a1111
from imagine.server.cluster import DEFAULT_LEASE, Cluster, RedisJobs, connect, describe
from imagine.server.jobs import Job, QueueFull
from imagine.server.models import ModelStore
from imagine.server.schemas import (
    ImageOut,
    JobCreated,
    JobOut,
    JobRequest,
    MergeRequest,
    UpscaleRequest,
    VariationsRequest,
)
from imagine.server.service import (
    Limits,
    RequestError,
    Service,
    decode_image,
    describe_validation,
    png_base64,
    upscale_pictures,
)
from imagine.train.merge import merge_files

STATIC = Path(str(resources.files("imagine.server") / "static"))


class _Guard:
    """ASGI middleware: optional basic auth on every route, and the request-size limit (413), checked
    before a body is read into memory."""

    def __init__(self, app, auth: tuple[str, str] | None, max_bytes: int):
        self.app, self.auth, self.max_bytes = app, auth, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.auth is not None and not self._authorized(headers.get(b"authorization", b"")):
            return await JSONResponse({"detail": "authentication required (basic auth, the --api-auth pair)"},
                                      401, {"WWW-Authenticate": 'Basic realm="imagine"'})(scope, receive, send)
        length = headers.get(b"content-length")
        too_big = JSONResponse({"detail": f"the request body is over the limit max_request_bytes="
                                          f"{self.max_bytes}"}, 413)
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await too_big(scope, receive, send)
            return await self.app(scope, receive, send)
        # no length (chunked): read it here, up to the limit, then replay it
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_big(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, value = header.decode("latin-1").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user, self.auth[0]) & secrets.compare_digest(password, self.auth[1])


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a client's lone surrogate echoed in an error message
    ("red \\ud800") cannot be encoded as UTF-8, and must not turn a 422 into a 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def create_app(models: list[Path], *, out_dir: Path | None = Path("outputs"), limits: Limits = Limits(),
               max_queue: int = 16, api_auth: str | None = None, vaes: list[Path] = (),
               allow_pickle: bool = False, models_dir: Path | None = None, allow_paths: bool = False,
               skip_broken: bool = False, watermark: bool = False, sign_key=None, device: str = "cpu",
               queue: str | None = None, wait_timeout: float = 600.0, lease: float | None = None,
               offload: str = "auto") -> FastAPI:
    """models: imagine or diffusers folders or SD single files, looked up by name afterwards (the first
    is current); vaes: separate VAEs a request may pick. out_dir: where images are saved (None: kept in
    memory only). api_auth: "USER:PASS" for basic auth on every route. allow_paths: requests may name
    LoRAs, ControlNets, IP-Adapters, embeddings and upscalers by path too (by default: names in the models
    folder only, and no error says anything about a path outside it). skip_broken: models that cannot be
    read are listed as broken (GET /api/v1/models) and the rest served. watermark: every image carries the
    invisible watermark; sign_key: an Ed25519 private key that signs every image's record; device: where the
    models run ("auto", "cpu", "cuda:1", ...). queue: a Redis URL: this node loads no model and puts jobs on
    that queue for ``imagine worker`` processes (server/cluster.py); a job no live worker can serve fails after
    wait_timeout seconds."""
    auth = None
    if api_auth is not None:
        user, sep, password = api_auth.partition(":")
        if not sep or not user or not password:
            raise ValueError("--api-auth takes USER:PASS")
        auth = (user, password)
    store = ModelStore(models, vaes, allow_pickle, models_dir, skip_broken, device if queue is None else "cpu",
                       offload if queue is None else "auto")
    jobs = None
    if queue is not None:
        jobs = RedisJobs(Cluster(connect(queue), lease or DEFAULT_LEASE), max_queue, limits.max_kept_bytes,
                         wait_timeout, sweep_every=min(2.0, (lease or DEFAULT_LEASE) / 4), models=store.names())
    service = Service(store, out_dir, limits, max_queue, allow_paths, watermark=watermark, sign_key=sign_key,
                      queue=jobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(service.recover)  # jobs from before a restart: failed or queued again
        service.local.start()
        service.queue.start()
        yield
        service.queue.stop()
        service.local.stop()

    app = FastAPI(title="imagine", version=__version__, lifespan=lifespan,
                  description="Text-to-image serving: a job API (queue, progress events, cancel) and "
                              "AUTOMATIC1111-compatible endpoints.")
    app.state.service = service
    app.add_middleware(_Guard, auth=auth, max_bytes=limits.max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # what was wrong, where; not the input itself (it may be a megabyte of base64)
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        errors = json.loads(json.dumps(errors, default=str))
        return AsciiJSONResponse({"detail": describe_validation(errors), "errors": errors}, 422)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return AsciiJSONResponse({"detail": str(exc)}, exc.status)

    if queue is not None:
        @app.exception_handler(redis.exceptions.RedisError)
        async def unreachable(request: Request, exc: Exception):
            return JSONResponse({"detail": f"the job queue's Redis server did not answer ({type(exc).__name__}: "
                                           f"{exc}); try again in a moment"}, 503, {"Retry-After": "5"})

    @app.exception_handler(QueueFull)
    async def full(request: Request, exc: QueueFull):
        return JSONResponse({"detail": str(exc)}, 429, {"Retry-After": str(exc.retry_after)})

    # ---- our job API
    def job_or_404(job_id: str) -> Job:
        job = service.queue.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept up to the server's --max-kept-mb of "
                                     "images, the oldest forgotten first)")
        return job

    def job_out(job: Job, request: Request, with_base64: bool = True) -> JobOut:
        images = [ImageOut(url=str(request.url_for("job_image", job_id=job.id, index=i)),
                           base64=png_base64(im.png) if with_base64 else None, seed=im.seed,
                           parameters=im.parameters, info=im.record) for i, im in enumerate(job.images)]
        return JobOut(id=job.id, kind=job.kind, model=job.model, status=job.status, progress=job.progress,
                      step=job.step, total=job.total, eta_seconds=job.eta(), error=job.error,
                      warnings=job.warnings, images=images, request=job.request,
                      message=job.message, worker=job.worker)

    @app.post("/api/v1/jobs", response_model=JobCreated, status_code=202, tags=["jobs"])
    def create_job(body: JobRequest, request: Request) -> JobCreated:
        """Queue a txt2img, img2img or inpaint job; 429 with Retry-After when the queue is full."""
        job = service.submit(body.model_dump(), body.kind)
        return JobCreated(id=job.id, status=job.status, url=str(request.url_for("get_job", job_id=job.id)),
                          warnings=job.warnings)

    @app.get("/api/v1/ip-adapters", tags=["jobs"])
    def ip_adapters() -> dict[str, list[dict[str, str]]]:
        """The IP-Adapters image prompts can name: the models folder's ipadapter/ and ControlNet/, then the
        shipped ones, each with its type (content, palette, intensity)."""
        return {"ip_adapters": [{"title": title, "type": adapter_type(peek(path).get("image_encoder"))}
                                for title, path in available(service.store.models_dir)]}

    @app.post("/api/v1/variations", response_model=JobCreated, status_code=202, tags=["jobs"])
    def create_variations(body: VariationsRequest, request: Request) -> JobCreated:
        """Queue variations of an image: a txt2img job whose image prompt is the image (its PNGs record it)."""
        job = service.submit(body.job().model_dump(), "txt2img")
        return JobCreated(id=job.id, status=job.status, url=str(request.url_for("get_job", job_id=job.id)),
                          warnings=job.warnings)

    @app.get("/api/v1/upscalers", tags=["upscale"])
    def upscalers() -> dict[str, list[str]]:
        """What hires fix and upscaling can name: resamplers, Latent (hires fix only) and SR stages."""
        return {"upscalers": upscaler_names(service.store.models_dir), "hires_only": [LATENT]}

    @app.post("/api/v1/upscale", tags=["upscale"])
    def upscale(body: UpscaleRequest) -> dict[str, list[dict]]:
        """Make pictures larger (A1111's Extras): answered when done, with each PNG and its parameters."""
        pictures = [decode_image(data, f"images[{i}]", service.limits) for i, data in enumerate(body.images)]
        second = (body.upscaler_2, body.upscaler_2_visibility) if body.upscaler_2 else None
        results = upscale_pictures(service, pictures, scale=body.scale, size=tuple(body.to) if body.to else None,
                                   crop=body.crop, upscaler=body.upscaler, second=second, prompt=body.prompt,
                                   seed=body.seed, noise_level=body.sr_noise_level, tile=body.tile)
        return {"images": [{"base64": png_base64(r.png()), "seed": r.seed, "parameters": r.parameters,
                            "info": r.record} for r in results]}

    @app.get("/api/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
    def get_job(job_id: str, request: Request, base64: bool = True) -> JobOut:
        """Status and progress; when done, the images (URL and base64) with their parameters."""
        return job_out(job_or_404(job_id), request, base64)

    @app.delete("/api/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
    def cancel_job(job_id: str, request: Request) -> JobOut:
        """Cancel: a queued job at once, a running one between two steps."""
        job = job_or_404(job_id)
        service.queue.cancel(job)
        return job_out(job, request, False)

    @app.get("/api/v1/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str, request: Request):
        """Server-Sent Events: `progress` (with a base64 preview when one is new) until `done`, `failed`
        or `cancelled`, whose data is the job as GET returns it, without base64."""
        job = job_or_404(job_id)

        async def stream():
            nonlocal job
            seen, preview = -1, None
            while True:
                job = (await run_in_threadpool(service.queue.get, job_id) if service.remote else
                       service.queue.get(job_id)) or job  # a snapshot from Redis, or the live job itself
                if job.version != seen:
                    seen = job.version
                    if job.done:
                        out = job_out(job, request, False).model_dump()
                        yield f"event: {job.status}\ndata: {json.dumps(out)}\n\n"
                        return
                    data = {"status": job.status, "progress": job.progress, "step": job.step, "total": job.total,
                            "eta_seconds": job.eta(), "message": job.message, "worker": job.worker}
                    if job.preview is not None and job.preview != preview:
                        preview = job.preview
                        data["preview"] = png_base64(preview)
                    yield f"event: progress\ndata: {json.dumps(data)}\n\n"
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.05)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/v1/jobs/{job_id}/images/{index}.png", name="job_image", tags=["jobs"])
    def job_image(job_id: str, index: int) -> Response:
        job = job_or_404(job_id)
        if not 0 <= index < len(job.images):
            raise HTTPException(404, f"job {job_id} has {len(job.images)} images; no index {index}")
        image = job.images[index]
        return Response(image.png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{image.seed:06d}-{job.kind}.png"'})

    @app.get("/api/v1/models", tags=["models"])
    def list_models() -> dict:
        return {"current": service.store.current, "vaes": list(service.store.vaes),
                "text_encoders": list(service.store.text_encoders),
                "models": [{"name": e.name, "title": e.title, "sha256": e.sha256, "path": str(e.path),
                            "defaults": {"steps": e.spec.default_steps, "sampler": e.spec.default_sampler,
                                         "cfg_scale": e.spec.default_cfg}, "takes": e.takes}
                           for e in service.store.entries()],
                "broken": [{"path": path, "error": error} for path, error in service.store.broken.items()]}

    @app.post("/api/v1/merge", tags=["models"])
    def merge(body: MergeRequest) -> dict:
        """A1111's checkpoint merger: served models A, B (and C) merged into a new model in the models
        folder's Stable-diffusion/, served at once under its name. Runs to the end before answering."""
        store = service.store
        if store.models_dir is None:
            raise RequestError("merging writes into the models folder: start the server with --models-dir DIR", 409)
        try:
            chosen = [store.lookup(body.primary)]
            try:
                chosen.append(store.lookup(body.secondary))
            except KeyError:  # B may be an adapter from Lora/: A + M dW
                try:
                    chosen.append(find(store.models_dir, "lora", body.secondary))
                except KeyError:
                    raise KeyError(f"model B {body.secondary!r} is neither a served model ({', '.join(store.names())})"
                                   " nor a LoRA in the models folder's Lora/") from None
            if body.tertiary is not None:
                chosen.append(store.lookup(body.tertiary))
        except KeyError as err:
            raise RequestError(err.args[0], 400) from None
        fmt = body.format or ("safetensors" if chosen[0].path.is_file() else "folder")
        out = Path(store.models_dir) / SECTIONS["checkpoints"] / (body.name + (".safetensors" if fmt == "safetensors"
                                                                               else ""))
        if body.name.endswith("-training"):  # the models folder's listing skips such names (a run's checkpoints)
            raise RequestError(f"a model name may not end in -training (those are training runs): {body.name!r}")
        with service.merge_lock:  # one merge at a time: two of the same name must not race for one path
            if body.name in store.names() or out.exists():
                raise RequestError(f"a model named {body.name!r} exists; choose another name", 409)
            try:
                merge_files([e.path for e in chosen], out, mode=body.mode, multiplier=body.multiplier,
                            dtype=body.dtype, allow_pickle=store.allow_pickle)
            except (ValueError, CheckpointError) as err:
                raise RequestError(str(err), 400) from None
            entry = store.add(out)
        return {"name": entry.name, "title": entry.title, "path": str(out), "mode": body.mode,
                "multiplier": body.multiplier, "models": [e.name for e in chosen]}

    @app.get("/api/v1/status", tags=["server"])
    def server_status() -> dict:
        kept = service.queue.kept_bytes() if service.remote else service.queue.store.kept_bytes()
        return {"version": __version__, "jobs": service.queue.counts(), "max_queue": service.queue.max_queue,
                "limits": service.limits.__dict__, "kept_bytes": kept, "models_loaded": service.store.loads,
                "queue": "redis" if service.remote else "embedded"}

    @app.get("/api/v1/cluster", tags=["server"])
    def cluster_status() -> dict:
        """With a Redis queue: the live workers (device, the models each can load and holds, its job), the jobs
        queued and running per model, and the recent failures. Embedded: this process is the one worker."""
        if not service.remote:
            current = service.queue.current
            return {"queue": "embedded", "workers": [{"name": "embedded", "device": str(service.store.device),
                                                      "models": service.store.names(),
                                                      "held": [n for n in service.store.names()
                                                               if service.store.is_loaded(n)],
                                                      "job": current.id if current else None}],
                    "jobs": service.queue.counts(), "failures": []}
        return describe(service.queue.cluster)

    app.include_router(a1111.router(service))
    app.include_router(a1111.controlnet_router(service))

    # ---- the web UI: one page, no CDN
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
