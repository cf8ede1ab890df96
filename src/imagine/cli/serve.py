"""imagine serve."""

from __future__ import annotations

from pathlib import Path

import typer

from imagine.cli.app import SERVE, app, default_model, fail


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
    watermark: bool = typer.Option(False, "--watermark", help="Write Stable Diffusion's invisible watermark into "
                                                              "every image made (256 x 256 pixels or more)."),
    sign_key: Path | None = typer.Option(None, "--sign-key", help="Sign every image's record with this Ed25519 "
                                                                 "private key (PEM; imagine keygen makes one)."),
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
                                device=device)
        for path, error in server_app.state.service.store.broken.items():
            typer.echo(f"warning: not serving {path}: {error}", err=True)
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach this machine can use the server"
                   + ("" if api_auth else " (consider --api-auth USER:PASS)"), err=True)
    typer.echo(f"imagine serving on http://{host}:{port} (web UI at /, API docs at /docs)")
    uvicorn.run(server_app, host=host, port=port, log_level="warning")


def _shipped_models() -> list:
    """The shipped model, and its LCM beside it where this install has it (the fast choice in every model list)."""
    from imagine.weights import FAST_MODEL

    return [default_model()] + ([FAST_MODEL] if (FAST_MODEL / "diffusion.json").exists() else [])
