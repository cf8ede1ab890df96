"""The `imagine` command: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import json

import typer

from imagine import __version__

app = typer.Typer(
    name="imagine",
    help="Diffusion-model image generation: train, sample, evaluate and serve, CPU first.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
