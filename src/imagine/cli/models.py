"""imagine export, samplers, version."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from imagine import __version__
from imagine.cli.app import app, fail


@app.command()
def samplers(
    as_json: bool = typer.Option(False, "--json", help="Print JSON with each sampler's A1111 aliases."),
) -> None:
    """List the sampler names, one per line (or as JSON with their A1111 aliases)."""
    from imagine.samplers import SAMPLERS, a1111_aliases

    if as_json:
        rows = [
            {"name": name, "a1111_aliases": a1111_aliases(name), "stochastic": info.stochastic,
             "description": info.description}
            for name, info in SAMPLERS.items()
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    for name in SAMPLERS:
        typer.echo(name)


@app.command()
def export(
    model: Path = typer.Argument(..., help="A model folder written by `imagine train`."),
    out: Path = typer.Argument(..., help="Where the exported folder goes (must not exist)."),
    dtype: str = typer.Option("fp16", help="Weights precision: fp16, bf16 or fp32."),
) -> None:
    """Copy a model folder for distribution: UNet (its EMA weights), VAE and spec only, in fp16 by default.
    Training state, checkpoints, samples and logs are left behind."""
    from imagine.io.checkpoint import CheckpointError
    from imagine.io.model_folder import export_model

    try:
        size = export_model(model, out, dtype)
    except (ValueError, CheckpointError) as err:
        fail(str(err))
    typer.echo(f"exported {model} -> {out} ({dtype}, {size / 1e6:.1f} MB)")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)
