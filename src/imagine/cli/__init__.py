"""The `imagine` command: parse arguments, call the library, print. Nothing else lives here.

One module per command family registers its commands on the one app: train (train, train-vae,
train-clip), generate (generate, img2img, inpaint, sample, info), evaluate (eval shapes, eval fid),
serve, models (export, samplers, version), control (detect) and upscale."""

from imagine.cli import control, evaluate, generate, models, serve, train, upscale  # noqa: F401  (they register)
from imagine.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
