"""imagine serve."""

from __future__ import annotations

from pathlib import Path

import typer

from imagine.cli.app import app, default_model, fail


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind; 0.0.0.0 exposes the server to your network."),
    port: int = typer.Option(7860, help="Port (A1111's default)."),
    model: list[Path] = typer.Option(None, help="Text-to-image model folder; repeat to offer several "
                                                "(default: the model shipped with imagine)."),
    out: Path = typer.Option(Path("outputs"), help="Where generated PNGs are saved, and the job store "
                                                   "(jobs.sqlite) that survives restarts."),
    api_auth: str | None = typer.Option(None, help="USER:PASS: basic auth on every route (A1111's --api-auth)."),
    max_queue: int = typer.Option(16, help="Jobs that may wait; more are answered 429 with Retry-After."),
    max_steps: int = typer.Option(150, help="Most sampling steps per request."),
    max_batch: int = typer.Option(8, help="Most images per request."),
    max_pixels: int = typer.Option(512 * 512, help="Most pixels (width x height) per image."),
    max_request_mb: float = typer.Option(16, help="Largest request body, in MiB."),
    max_kept_mb: float = typer.Option(256, help="Finished jobs' images kept for GET (in the job store), in MiB; "
                                                "the oldest jobs are forgotten beyond it."),
) -> None:
    """Serve the HTTP API (ours at /api/v1, A1111's at /sdapi/v1), the web UI at / and API docs at /docs."""
    import uvicorn

    from imagine.io.checkpoint import CheckpointError
    from imagine.server import Limits, create_app

    try:
        limits = Limits(max_pixels=max_pixels, max_steps=max_steps, max_batch=max_batch,
                        max_request_bytes=int(max_request_mb * 1024 * 1024),
                        max_kept_bytes=int(max_kept_mb * 1024 * 1024))
        server_app = create_app(list(model or []) or [default_model()], out_dir=out, limits=limits, max_queue=max_queue,
                                api_auth=api_auth)
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach this machine can use the server"
                   + ("" if api_auth else " (consider --api-auth USER:PASS)"), err=True)
    typer.echo(f"imagine serving on http://{host}:{port} (web UI at /, API docs at /docs)")
    uvicorn.run(server_app, host=host, port=port, log_level="warning")
