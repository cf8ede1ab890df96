"""imagine serve."""

from __future__ import annotations

from pathlib import Path

import typer

from imagine.cli.app import SERVE, app, default_model, fail

OFFLOAD = typer.Option("auto", "--offload", help="On a GPU: auto (every network on it when they fit, else each "
                                                 "brought there only to run), none, model or sequential.")


@app.command(rich_help_panel=SERVE)
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind; 0.0.0.0 exposes the server to your network."),
    port: int = typer.Option(7860, help="Port (A1111's default)."),
    model: list[str] = typer.Option(None, help="A model: imagine or diffusers folder, SD .safetensors or a name in "
                                               "the models folder; repeat to offer several (default: every "
                                               "checkpoint in the models folder, else the shipped model)."),
    models_dir: Path | None = typer.Option(None, help="A1111-style models folder: its Stable-diffusion/ "
                                                      "checkpoints and VAE/ files are offered (default: ./models)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also offer .ckpt pickles (read weights "
                                                                   "only)."),
    out: Path = typer.Option(Path("outputs"), help="Where generated PNGs are saved, and the job store "
                                                   "(jobs.sqlite) that survives restarts."),
    api_auth: str | None = typer.Option(None, envvar="IMAGINE_API_AUTH",
                                        help="USER:PASS: basic auth on every route (A1111's --api-auth); also read "
                                             "from IMAGINE_API_AUTH, which, unlike a flag, does not show in ps."),
    api_auth_file: Path | None = typer.Option(None, help="A file whose first line is USER:PASS (kept out of the "
                                                         "process list and shell history)."),
    allow_paths: bool = typer.Option(False, "--allow-paths", help="Let requests name LoRAs, ControlNets, "
                                     "IP-Adapters, embeddings and upscalers by path on this machine; by default "
                                     "only by name in the models folder."),
    max_queue: int = typer.Option(16, help="Jobs that may wait; more are answered 429 with Retry-After."),
    max_steps: int = typer.Option(150, help="Most sampling steps per request."),
    max_batch: int = typer.Option(8, help="Most images per request."),
    max_pixels: int = typer.Option(512 * 512, help="Most pixels (width x height) per image."),
    max_request_mb: float = typer.Option(16, help="Largest request body, in MiB."),
    max_kept_mb: float = typer.Option(256, help="Finished jobs' images kept for GET (in the job store), in MiB; "
                                                "the oldest jobs are forgotten beyond it."),
    device: str = typer.Option("auto", "--device", help="Where the models run: auto (a CUDA GPU, then Apple's MPS, "
                                                         "then the CPU), cpu, cuda, cuda:N or mps."),
    offload: str = OFFLOAD,
    watermark: bool = typer.Option(False, "--watermark", help="Write Stable Diffusion's invisible watermark into "
                                                              "every image made (256 x 256 pixels or more)."),
    sign_key: Path | None = typer.Option(None, "--sign-key", help="Sign every image's record with this Ed25519 "
                                                                 "private key (PEM; imagine keygen makes one)."),
    queue: str | None = typer.Option(None, "--queue", envvar="IMAGINE_QUEUE",
                                     help="redis://HOST:PORT/DB: load no model here; put jobs on this Redis queue, "
                                          "run by `imagine worker` processes on any machine (docs/deployment.md)."),
    wait_timeout: float = typer.Option(600, help="With --queue: seconds a job waits for a live worker that can load "
                                                 "its model before it fails."),
    lease: float = typer.Option(30, help="With --queue: seconds after a worker's last heartbeat before its job runs "
                                         "again elsewhere (the same on every node and worker)."),
) -> None:
    """Serve the HTTP API (ours at /api/v1, A1111's at /sdapi/v1), the web UI at / and API docs at /docs."""
    import uvicorn

    from imagine.io import models_dir as md
    from imagine.io.checkpoint import CheckpointError
    from imagine.io.provenance import load_signing_key
    from imagine.server import Limits, create_app

    try:
        if api_auth_file is not None:
            try:
                api_auth = api_auth_file.read_text().splitlines()[0].strip()
            except (OSError, IndexError):
                raise ValueError(f"--api-auth-file {api_auth_file}: cannot read a USER:PASS line from it") from None
        folder = models_dir if models_dir is not None else md.default_models_dir()
        listed = [e.path for e in md.entries(folder, "checkpoints")
                  if allow_pickle or e.path.is_dir() or e.path.suffix == ".safetensors"]
        paths = [md.resolve(m, folder) for m in model] if model else listed or _shipped_models()
        vaes = [e.path for e in md.entries(folder, "vae") if e.path.is_dir() or e.path.suffix == ".safetensors"]
        limits = Limits(max_pixels=max_pixels, max_steps=max_steps, max_batch=max_batch,
                        max_request_bytes=int(max_request_mb * 1024 * 1024),
                        max_kept_bytes=int(max_kept_mb * 1024 * 1024))
        server_app = create_app(paths, out_dir=out, limits=limits, max_queue=max_queue, api_auth=api_auth,
                                vaes=vaes, allow_pickle=allow_pickle, models_dir=folder, allow_paths=allow_paths,
                                skip_broken=not model,  # the folder's broken files are listed; a named one stops
                                watermark=watermark, sign_key=load_signing_key(sign_key) if sign_key else None,
                                device=device, queue=queue, wait_timeout=wait_timeout, lease=lease,
                                offload=offload)
        if queue is not None and (watermark or sign_key):
            typer.echo("warning: with --queue the workers make the images: give --watermark / --sign-key to "
                       "`imagine worker`", err=True)
        for path, error in server_app.state.service.store.broken.items():
            typer.echo(f"warning: not serving {path}: {error}", err=True)
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach this machine can use the server"
                   + ("" if api_auth else " (consider --api-auth USER:PASS)"), err=True)
    typer.echo(f"imagine serving on http://{host}:{port} (web UI at /, API docs at /docs)"
               + (f"; jobs go to {_redacted(queue)}" if queue else ""))
    uvicorn.run(server_app, host=host, port=port, log_level="warning")


def _shipped_models() -> list:
    """The shipped model, and its LCM beside it where this install has it (the fast choice in every model list)."""
    from imagine.weights import FAST_MODEL

    return [default_model()] + ([FAST_MODEL] if (FAST_MODEL / "diffusion.json").exists() else [])


def _redacted(url: str) -> str:
    """A Redis URL without its password (for logs)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return url.replace(f":{parts.password}@", ":***@") if parts.password else url


def _served(model: list[str] | None, models_dir: Path | None, allow_pickle: bool) -> tuple[Path, list, list]:
    from imagine.io import models_dir as md

    folder = models_dir if models_dir is not None else md.default_models_dir()
    listed = [e.path for e in md.entries(folder, "checkpoints")
              if allow_pickle or e.path.is_dir() or e.path.suffix == ".safetensors"]
    paths = [md.resolve(m, folder) for m in model] if model else listed or _shipped_models()
    vaes = [e.path for e in md.entries(folder, "vae") if e.path.is_dir() or e.path.suffix == ".safetensors"]
    return folder, paths, vaes


@app.command(rich_help_panel=SERVE)
def worker(
    queue: str = typer.Option(..., "--queue", envvar="IMAGINE_QUEUE", help="redis://HOST:PORT/DB: the queue "
                                                                           "`imagine serve --queue` feeds."),
    model: list[str] = typer.Option(None, help="A model this worker can run (as serve takes them); repeat for "
                                               "several (default: the models folder's checkpoints, else the "
                                               "shipped model). Jobs for other models go to other workers."),
    models_dir: Path | None = typer.Option(None, help="A1111-style models folder: checkpoints, VAE/, Lora/, "
                                                      "ControlNet/, embeddings/ (default: ./models)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also run .ckpt pickles (read weights only)."),
    allow_paths: bool = typer.Option(False, "--allow-paths", help="Let requests name files by path on this "
                                                                 "machine (as serve --allow-paths)."),
    device: str = typer.Option("auto", "--device", help="Where the models run: auto, cpu, cuda, cuda:N or mps "
                                                         "(one worker per GPU)."),
    offload: str = OFFLOAD,
    out: Path | None = typer.Option(None, help="Also save every PNG here (the results always go to the queue, "
                                               "where every API node reads them)."),
    name: str | None = typer.Option(None, help="This worker's name in `imagine status` (default: host.pid)."),
    lease: float = typer.Option(30, help="Seconds after this worker's last heartbeat before its job runs again "
                                         "elsewhere (as serve --lease)."),
    watermark: bool = typer.Option(False, "--watermark", help="Write Stable Diffusion's invisible watermark into "
                                                              "every image made (256 x 256 pixels or more)."),
    sign_key: Path | None = typer.Option(None, "--sign-key", help="Sign every image's record with this Ed25519 "
                                                                 "private key."),
    burst: bool = typer.Option(False, "--burst", help="Stop when the queue is empty (batch runs, tests)."),
    preload: bool = typer.Option(False, "--preload", help="Load every model before taking jobs (a restarted "
                                                          "worker is ready at once; it says it holds them)."),
) -> None:
    """Run jobs from a Redis queue (`imagine serve --queue`): one job at a time on one device; a worker never
    listens on a port. Stop with Ctrl-C or SIGTERM: the running job finishes first."""
    from imagine.io.checkpoint import CheckpointError
    from imagine.io.provenance import load_signing_key
    from imagine.server.cluster import Cluster, connect, run_worker
    from imagine.server.models import ModelStore
    from imagine.server.service import Limits, Service

    try:
        folder, paths, vaes = _served(model, models_dir, allow_pickle)
        store = ModelStore(paths, vaes, allow_pickle, folder, skip_broken=not model, device=device, offload=offload)
        for path, error in store.broken.items():
            typer.echo(f"warning: not running {path}: {error}", err=True)
        unbounded = 1 << 62  # the API nodes hold the limits; a worker runs what they let through
        limits = Limits(max_pixels=unbounded, max_steps=unbounded, max_batch=unbounded, max_request_bytes=unbounded,
                        max_input_pixels=unbounded, max_kept_bytes=0)
        service = Service(store, out, limits, 1, allow_paths, watermark=watermark,
                          sign_key=load_signing_key(sign_key) if sign_key else None)
        cluster = Cluster(connect(queue), lease)
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    typer.echo(f"imagine worker on {store.device}: models {', '.join(store.names())}; queue {_redacted(queue)}")
    held = set()
    if preload:
        for loaded in store.names():
            try:
                store.get(loaded)
            except (ValueError, CheckpointError, FileNotFoundError) as err:
                fail(f"--preload {loaded}: {err}")
            held.add(loaded)
    run_worker(cluster, service, name=name, burst=burst, held=held)


@app.command(rich_help_panel=SERVE)
def status(
    queue: str = typer.Option(..., "--queue", envvar="IMAGINE_QUEUE", help="redis://HOST:PORT/DB"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """The workers (device, models they can load and hold, their job), the jobs queued and running per model,
    and the recent failures of a Redis queue."""
    import json
    import time

    from rich.console import Console
    from rich.table import Table

    from imagine.server.cluster import Cluster, connect, describe

    try:
        info = describe(Cluster(connect(queue)))  # a reader: it writes no configuration and sweeps nothing
    except ValueError as err:
        fail(str(err))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    console = Console()
    now = time.time()
    table = Table(title=f"workers ({len(info['workers'])} live)")
    for column in ("name", "device", "can load", "holds", "job", "done", "seen"):
        table.add_column(column)
    for w in info["workers"]:
        table.add_row(w["name"], w["device"], ", ".join(w["models"]), ", ".join(w["held"]), w["job"] or "idle",
                      str(w["jobs_done"]), f"{now - w['seen']:.0f} s ago")
    console.print(table)
    jobs_table = Table(title="jobs")
    for column in ("model", "queued", "running"):
        jobs_table.add_column(column)
    for model, counts in sorted(info["models"].items()):
        jobs_table.add_row(model, str(counts["queued"]), str(counts["running"]))
    console.print(jobs_table)
    console.print(f"finished jobs kept: {info['jobs']['finished']} ({info['kept_bytes'] / 2**20:.1f} MiB)")
    for f in info["failures"][:10]:
        console.print(f"[red]failed[/red] {f['id']} ({f.get('model')}), {now - f['time']:.0f} s ago: {f['error']}")
