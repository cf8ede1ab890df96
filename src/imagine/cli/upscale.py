"""imagine upscale: A1111's Extras tab on the command line."""

from __future__ import annotations

from pathlib import Path

import typer

from imagine.cli.app import EDIT, app, fail


@app.command(rich_help_panel=EDIT)
def upscale(
    images: list[Path] = typer.Argument(None, help="Pictures to make larger (any size; each on its own)."),
    scale: float = typer.Option(4.0, help="How many times larger (A1111's 'Resize')."),
    upscaler: str = typer.Option("shapes-sr", help="shapes-sr (the shipped 4x super-resolution stage), an SR stage "
                                                   "or cascade (imagine train-sr: a path, or a name in the models "
                                                   "folder's SR/), or a resampler: Lanczos, Bicubic, Bilinear, "
                                                   "Nearest."),
    to: str | None = typer.Option(None, "--to", help="A target size WxH instead of --scale: scaled to cover it, "
                                                      "then cropped to it about the centre (A1111's 'Scale to')."),
    crop: bool = typer.Option(True, "--crop/--no-crop", help="With --to: crop to the size (else keep the cover)."),
    upscaler_2: str | None = typer.Option(None, "--upscaler-2", help="A second upscaler blended in (A1111's "
                                                                      "'Upscaler 2')."),
    visibility_2: float = typer.Option(0.5, "--upscaler-2-visibility", help="How much of the second upscaler's "
                                                                              "result (0 to 1)."),
    prompt: str = typer.Option("", help="SR stages are text-conditioned: what the picture shows helps them."),
    seed: int = typer.Option(0, help="Seed of the first picture's SR noise; picture i uses seed + i."),
    tile: int | None = typer.Option(None, help="SR stages sample in overlapping tiles of this many output pixels "
                                               "(default: whole pictures): for large pictures; seams are feathered "
                                               "away."),
    noise_level: int | None = typer.Option(None, help="SR noise-augmentation level (default: each stage's own; "
                                                      "higher invents more detail, lower keeps closer to the input)."),
    models_dir: Path | None = typer.Option(None, help="A1111-style models folder (default: ./models)."),
    out: Path = typer.Option(Path("outputs"), help="Folder for the PNGs (existing files are never overwritten)."),
    from_image: Path | None = typer.Option(None, "--from", help="Redo an upscale from the PNG it wrote."),
    device: str = typer.Option("auto", "--device", help="Where SR stages run: auto (a CUDA GPU, then Apple's MPS, "
                                                        "then the CPU), cpu, cuda, cuda:N or mps."),
) -> None:
    """Make pictures larger with a super-resolution diffusion stage or a resampler. Each PNG keeps the
    picture's own A1111 parameters, adds A1111's postprocessing fields, and records how to redo it (--from)."""
    from imagine.io import models_dir as md
    from imagine.io.checkpoint import CheckpointError
    from imagine.pipelines.output import save
    from imagine.pipelines.request import input_record, open_image
    from imagine.pipelines.settings import Settings

    if from_image is not None:
        if images:
            fail("--from redoes one upscale from its PNG; leave out the pictures")
        images, settings, scale, upscaler, size, crop, second = _from_record(from_image)
    else:
        if not images:
            fail("give pictures to upscale, or --from PNG")
        settings = Settings(prompt=prompt, seed=seed, sr_noise_level=noise_level, tile=tile)
        size = _size(to) if to is not None else None
        second = (upscaler_2, visibility_2) if upscaler_2 is not None else None
    try:
        from imagine.pipelines.upscale import resolve_upscaler, upscale_pictures

        models_dir = models_dir if models_dir is not None else md.default_models_dir()
        chosen = resolve_upscaler(upscaler, models_dir)
        other = (resolve_upscaler(second[0], models_dir), float(second[1])) if second is not None else None
        pictures = [open_image(path, "picture") for path in images]
        results = upscale_pictures(pictures, scale, chosen, settings.validate(), None,
                                   [input_record(path) for path in images], size=size, crop=crop, second=other,
                                   device=device)
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        fail(str(err))
    for path in save(results, out):
        typer.echo(str(path))


def _from_record(png: Path):
    """(pictures, settings, scale, upscaler) of the upscale a PNG records; its input must still be there, unchanged."""
    from dataclasses import fields

    from imagine.io.png import file_hash, read_png_metadata
    from imagine.pipelines.settings import Settings

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
    how = record.get("upscale") or {}
    size = tuple(how["size"]) if how.get("size") else None
    second = tuple(how["second"]) if how.get("second") else None
    return [path], settings, settings.hires_scale, settings.hires_upscaler, size, how.get("crop", True), second


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        fail(f"--to {text!r}: write the size as WIDTHxHEIGHT, e.g. 512x512")
    return w, h
