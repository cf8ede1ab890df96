"""The `imagine` Typer app and what every command family shares: failing with a message, progress bars."""

from __future__ import annotations

from typing import NoReturn

import typer

# the --help panels, in the order they are shown (a panel appears where its first command registers:
# cli/__init__.py imports the command families in this order)
GENERATE, EDIT, TRAIN, MODELS, SERVE, EVALUATE = "Generate", "Edit", "Train", "Models", "Serve", "Evaluate"

app = typer.Typer(
    name="imagine",
    help="Diffusion-model image generation: train, sample, evaluate and serve, CPU first.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",  # for the panels; help texts are escaped (escape_help_markup) to read as written
)
eval_app = typer.Typer(help="Evaluate models: ShapesEval (prompt following), CLIP score, FID/KID.",
                       no_args_is_help=True, rich_markup_mode="rich")


def escape_help_markup(typer_app: typer.Typer, done: set[int] | None = None) -> None:
    """Escape rich markup in every help text of ``typer_app`` and its groups, once each (commands share
    option objects): our help texts are plain text, and rich would eat each [bracketed] word as a tag
    (`--control`'s TYPE[@MODEL], A1111's [word])."""
    import inspect

    from rich.markup import escape

    done = set() if done is None else done
    for info in typer_app.registered_commands:
        info.help = escape(info.help or inspect.getdoc(info.callback) or "")
        for parameter in inspect.signature(info.callback).parameters.values():
            default = parameter.default
            if isinstance(default, typer.models.ParameterInfo) and default.help and id(default) not in done:
                done.add(id(default))
                default.help = escape(default.help)
    for group in typer_app.registered_groups:
        escape_help_markup(group.typer_instance, done)


def _print_version(value: bool) -> None:
    if value:
        from imagine import __version__

        typer.echo(f"imagine {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print imagine's version and exit.")) -> None:
    """Diffusion-model image generation: train, sample, evaluate and serve, CPU first."""


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
