"""The `imagine` command: parse arguments, call the library, print. Nothing else lives here.

One module per command family registers its commands on the one app: train (train, train-vae,
train-clip), generate (generate, img2img, inpaint, sample, info), evaluate (eval shapes, eval fid),
serve, models (export, samplers, version), control (detect) and upscale."""

# the order of registration is the order of --help's panels: Generate, Edit, Train, Models, Serve, Evaluate
from imagine.cli import generate, upscale, control, train, models, serve, evaluate  # noqa: F401, I001  (they register)
from imagine.cli.app import EVALUATE, app, escape_help_markup, eval_app

app.add_typer(eval_app, name="eval", rich_help_panel=EVALUATE)
escape_help_markup(app)


def main() -> None:
    app()


__all__ = ["app", "main"]
