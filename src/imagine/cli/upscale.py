"""imagine upscale: A1111's Extras tab on the command line."""

from __future__ import annotations

from pathlib import Path

import typer

from imagine.cli.app import app, fail


@app.command()
def upscale(
    images: list[Path] = typer.Argument(None, help="Pictures to make larger (any size; each on its own)."),
    scale: float = typer.Option(4.0, help="How many times larger (A1111's 'Resize')."),
    upscaler: str = typer.Option("shapes-sr", help="shapes-sr (the shipped 4x super-resolution stage), an SR stage "
                                                   "or cascade (imagine train-sr: a path, or a name in the models "
                                                   "folder's SR/), or a resampler: Lanczos, Bicubic, Bilinear, "
                                                   "Nearest."),
    prompt: str = typer.Option("", help="SR stages are text-conditioned: what the picture shows helps them."),
    seed: int = typer.Option(0, help="Seed of the first picture's SR noise; picture i uses seed + i."),
    noise_level: int | None = typer.Option(None, help="SR noise-augmentation level (default: each stage's own; "
                                                      "higher invents more detail, lower keeps closer to the input)."),
    models_dir: Path | None = typer.Option(None, help="A1111-style models folder (default: ./models)."),
    out: Path = typer.Option(Path("outputs"), help="Folder for the PNGs (existing files are never overwritten)."),
    from_image: Path | None = typer.Option(None, "--from", help="Redo an upscale from the PNG it wrote."),
) -> None:
    """Make pictures larger with a super-resolution diffusion stage or a resampler. Each PNG keeps the
    picture's own A1111 parameters, adds A1111's postprocessing fields, and records how to redo it (--from)."""
    from imagine.io import models_dir as md
    from imagine.io.checkpoint import CheckpointError
    from imagine.pipelines.generate import Settings
    from imagine.pipelines.request import input_record, open_image, save

    if from_image is not None:
        if images:
            fail("--from redoes one upscale from its PNG; leave out the pictures")
        images, settings, scale, upscaler = _from_record(from_image)
    else:
        if not images:
            fail("give pictures to upscale, or --from PNG")
        settings = Settings(prompt=prompt, seed=seed, sr_noise_level=noise_level)
    try:
        from imagine.pipelines.upscale import resolve_upscaler, upscale_pictures

        models_dir = models_dir if models_dir is not None else md.default_models_dir()
        chosen = resolve_upscaler(upscaler, models_dir)
        encoder = None
        if chosen.kind == "sr":
            from imagine.models.text_encoders import load_text_encoder

            encoder = load_text_encoder(chosen.stages[0].spec.text_encoder)
        pictures = [open_image(path, "picture") for path in images]
        results = upscale_pictures(pictures, scale, chosen, settings.validate(), encoder,
                                   [input_record(path) for path in images])
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    for path in save(results, out):
        typer.echo(str(path))


def _from_record(png: Path):
    """(pictures, settings, scale, upscaler) of the upscale a PNG records; its input must still be there, unchanged."""
    from dataclasses import fields

    from imagine.io.png import file_hash, read_png_metadata
    from imagine.pipelines.generate import Settings

    try:
        _, record = read_png_metadata(png)
    except ValueError as err:
        fail(str(err))
    if record is None or record.get("kind") != "upscale":
        fail(f"{png} records no upscale (imagine generate --from redoes generated images)")
    source = record.get("input") or {}
    path = Path(source.get("path", ""))
    if not path.is_file():
        fail(f"{png} was upscaled from {path}, which no longer exists")
    if source.get("sha256_10") and file_hash(path) != source["sha256_10"]:
        fail(f"{path} has changed since {png} was made from it (hash {file_hash(path)}, recorded "
             f"{source['sha256_10']})")
    known = {f.name for f in fields(Settings)}
    settings = Settings.from_record({k: v for k, v in record["settings"].items() if k in known})
    return [path], settings, settings.hires_scale, settings.hires_upscaler
