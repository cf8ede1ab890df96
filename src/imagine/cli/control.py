"""imagine detect: run a ControlNet preprocessor on an image (the maps --control reads)."""

from __future__ import annotations

from pathlib import Path

import typer

from imagine.cli.app import EDIT, app, fail


@app.command(rich_help_panel=EDIT)
def detect(
    module: str = typer.Argument(..., help="The preprocessor: canny, scribble, segmentation, keypoints, tile."),
    image: Path = typer.Argument(..., help="The image to read."),
    out: Path = typer.Option(..., help="The condition map to write (PNG)."),
    resolution: int | None = typer.Option(None, help="Run at this short side (A1111's processor resolution; "
                                                     "default: the image's own)."),
    threshold_a: float | None = typer.Option(None, help="The preprocessor's first setting (canny: low threshold, "
                                                        "0-255; scribble: stroke width; tile: down-sampling rate)."),
    threshold_b: float | None = typer.Option(None, help="Its second (canny: high threshold, 0-255)."),
) -> None:
    """Write the condition map a ControlNet or T2I-Adapter reads. The PNG is marked with its type, so
    `--control TYPE:MAP.png` uses it as it is instead of running the preprocessor again."""
    from PIL import Image, PngImagePlugin

    from imagine.adapters.control import CONDITION_KEY
    from imagine.data.conditions import detect as run
    from imagine.pipelines.request import open_image

    try:
        if module == "none":
            raise ValueError("'none' runs no preprocessor; choose canny, scribble, segmentation, keypoints or tile")
        result = run(module, open_image(image, "image"), resolution, threshold_a, threshold_b)
    except ValueError as err:
        fail(str(err))
    info = PngImagePlugin.PngInfo()
    info.add_text(CONDITION_KEY, module)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    Image.fromarray(result).save(tmp, format="PNG", pnginfo=info)
    tmp.replace(out)
    typer.echo(str(out))
