"""The `imagine` Typer app and what every command family shares: failing with a message, progress bars."""

from __future__ import annotations

from typing import NoReturn

import typer

app = typer.Typer(
    name="imagine",
    help="Diffusion-model image generation: train, sample, evaluate and serve, CPU first.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Evaluate models: ShapesEval (prompt following), CLIP score, FID/KID.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def training_progress():
    """A training hook drawing a tqdm bar (loss and images/s); call it with info None to close the bar."""
    from tqdm import tqdm

    state: dict = {}

    def hook(info, context):
        if info is None:
            if "bar" in state:
                state.pop("bar").close()
            return
        if "bar" not in state:
            state["bar"] = tqdm(total=info.total, initial=info.step - 1, desc="train", unit="step", dynamic_ncols=True)
        state["bar"].update(1)
        state["bar"].set_postfix(loss=f"{info.loss:.4f}", img_s=f"{info.images_per_s:.0f}")

    return hook


def default_model():
    from imagine.weights import default_model as shipped

    try:
        return shipped()
    except FileNotFoundError as err:
        fail(str(err))
