"""What a newcomer meets first, through the CLI in-process: help that reads as written, a version, the shipped
models listed without a models folder, and one clear line (exit 2, no traceback, nothing allocated) for sizes
that cannot fit, a --size out of reach, missing or broken input images, and words the model never saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from imagine import __version__
from imagine.cli import app
from imagine.pipelines import generate as g

runner = CliRunner()


def _invoke(*args: str, columns: int = 400):
    return runner.invoke(app, list(args), env={"COLUMNS": str(columns), "NO_COLOR": "1"})


def test_help_keeps_bracketed_text_and_groups_the_commands():
    top = _invoke("--help").output
    panels = [p for p in ("Generate", "Edit", "Train", "Models", "Serve", "Evaluate") if f"─ {p} " in top]
    assert panels == ["Generate", "Edit", "Train", "Models", "Serve", "Evaluate"]
    assert top.index("─ Generate ") < top.index(" generate ") < top.index("─ Edit ") < top.index(" img2img ")
    assert "(word:1.3), [word]." in _invoke("generate", "--help").output
    for command in ("generate", "img2img", "inpaint"):
        text = _invoke(command, "--help").output
        assert "TYPE[@MODEL]:IMAGE[:WEIGHT[:START:END]]" in text and "[TYPE[@MODEL]:]IMAGE" in text
        assert "\\[" not in text


def test_version():
    result = _invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"imagine {__version__}"


def test_models_lists_the_shipped_models_without_a_models_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke("models", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["name"] for r in rows} >= {"shapes-default", "shapes-lcm", "shapes-sr", "shapes-clip"}
    assert all(r["section"] == "shipped" and len(r["hash"]) == 10 and r["bytes"] > 0 for r in rows)
    assert _invoke("models", "--models-dir", str(tmp_path / "nope")).exit_code == 2


def _one_line_error(result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in line, line
    for word in words:
        assert word in line, line
    return line


def test_a_size_that_cannot_fit_is_refused_before_allocating_with_what_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(g, "available_memory", lambda: 8 * 2**30)
    line = _one_line_error(_invoke("generate", "a red circle", "--width", "100000", "--height", "100000",
                                   "--out", str(tmp_path)), "100000x100000", "GB", "fits", "(decoding)")
    side = int(line.split("at most about ")[1].split("x")[0])
    assert side % 4 == 0 and side >= 256  # a multiple of the latent factor, and not absurdly small
    assert not list(tmp_path.iterdir())


def test_what_fits_does_fit():
    from imagine.io.model_folder import load_model_folder
    from imagine.weights import DEFAULT_MODEL

    model = load_model_folder(DEFAULT_MODEL)
    with pytest.raises(ValueError, match="at most about") as err:
        g.check_memory(model, 100_000, 100_000, 2, available=4 * 2**30)
    side = int(str(err.value).split("at most about ")[1].split("x")[0])
    g.check_memory(model, side, side, 2, available=4 * 2**30)  # no error
    # sampling tiles bound the sampling, VAE tiles the decoding: with both, a larger image fits (the images
    # themselves still have to); a refusal because the images cannot be held does not suggest --tile
    from imagine.pipelines.memory import decode_bytes, largest_side, sampling_bytes

    assert sampling_bytes(model, 4096, 4096, 2, 512) < sampling_bytes(model, 4096, 4096, 2) / 10
    assert decode_bytes(model, 4096, 4096, 2) > sampling_bytes(model, 4096, 4096, 2)
    assert decode_bytes(model, 4096, 4096, 2, vae_tile=512) < decode_bytes(model, 4096, 4096, 2) / 5
    bigger = largest_side(model, 2, 512, 4 * 2**30)
    assert bigger > side
    g.check_memory(model, bigger, bigger, 2, tile=512, available=4 * 2**30)  # fits, in VAE tiles
    with pytest.raises(ValueError, match=r"\(decoding\).*at most about") as err:
        g.check_memory(model, 100_000, 100_000, 1, tile=512, available=4 * 2**30)
    assert "--tile" not in str(err.value)


def test_size_beyond_the_upscalers_reach_names_the_largest(tmp_path):
    _one_line_error(_invoke("generate", "a red circle", "--size", "100000", "--out", str(tmp_path)),
                    "--size 100000", "at most --size 512")


def test_missing_and_broken_input_images_are_one_line(tmp_path):
    _one_line_error(_invoke("img2img", str(tmp_path / "gone.png"), "a red circle"), "does not exist", "gone.png")
    (tmp_path / "text.png").write_text("not a picture")
    _one_line_error(_invoke("img2img", str(tmp_path / "text.png"), "a red circle"), "not an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    _one_line_error(_invoke("inpaint", str(tmp_path / "ok.png"), str(tmp_path / "nomask.png"), "x"), "mask")


def test_words_the_model_never_saw_are_warned_about_on_stderr(tmp_path):
    result = _invoke("generate", "draw a cat", "--steps", "2", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "warning: the prompt has words shapes-default never saw" in result.stderr and "draw, cat" in result.stderr
    quiet = _invoke("generate", "a red circle above a blue square", "--steps", "2", "--out", str(tmp_path))
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr


def test_from_regenerates_img2img_and_inpaint_and_checks_inputs_and_weights(tmp_path):
    """--from takes every kind: img2img and inpaint come back pixel for pixel from their recorded inputs; a
    changed input or other weights are refused, named, instead of quietly making other pixels."""
    import numpy as np

    out = tmp_path / "out"
    assert _invoke("generate", "a red circle", "--steps", "3", "--out", str(out)).exit_code == 0
    init = out / "000000-txt2img.png"
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(np.arange(64)[None, :] >= 32, 255, 0).astype(np.uint8).repeat(64, 0)).save(mask)
    made = {}
    for kind, extra in (("img2img", []), ("inpaint", [str(mask)])):
        result = _invoke(kind, str(init), *extra, "a blue square", "--steps", "3", "--seed", "4", "--out", str(out))
        assert result.exit_code == 0, result.output
        made[kind] = Path(result.stdout.strip().splitlines()[-1])
        again = _invoke("generate", "--from", str(made[kind]), "--out", str(tmp_path / "again"))
        assert again.exit_code == 0, again.output
        redone = Path(again.stdout.strip().splitlines()[-1])
        assert "-" + kind in redone.name
        assert np.array_equal(np.asarray(Image.open(redone)), np.asarray(Image.open(made[kind])))
    Image.new("L", (64, 64), 255).save(mask)  # the mask changes: refused, with both hashes
    _one_line_error(_invoke("generate", "--from", str(made["inpaint"]), "--out", str(tmp_path)), "has changed",
                    "mask.png")
    from imagine.weights import FAST_MODEL

    _one_line_error(_invoke("generate", "--from", str(made["img2img"]), "--model", str(FAST_MODEL), "--out",
                            str(tmp_path)), "shapes-default", "other pixels")


def test_plan_prints_each_stage_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(g, "available_memory", lambda: 8 * 2**30)
    fits = _invoke("generate", "a red circle", "--plan", "--n", "2", "--out", str(tmp_path))
    assert fits.exit_code == 0, fits.output
    for words in ("memory plan for 64x64 x 2 images on cpu", "weights (resident)", "sampling", "decoding",
                  "8.00 GB free", "fits"):
        assert words in fits.stdout, fits.stdout
    big = _invoke("generate", "a red circle", "--plan", "--width", "100000", "--height", "100000", "--tile", "512",
                  "--out", str(tmp_path))
    assert big.exit_code == 1 and "does not fit" in big.stdout and "(decoding)" in big.stdout, big.stdout
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_vae_slicing_decodes_the_same_pixels(monkeypatch):
    """When a batch's decoding would not fit, the VAE decodes a few images at a time: the same pixels, as every
    batch of two rows or more computes a row the same (a last lone row is decoded beside its neighbour)."""
    import torch

    from imagine.io.model_folder import load_model_folder
    from imagine.pipelines import memory
    from imagine.weights import DEFAULT_MODEL

    model = load_model_folder(DEFAULT_MODEL)
    f = model.latent_factor
    z = torch.randn(5, model.vae.config.latent_channels, 64 // f, 64 // f, generator=torch.Generator().manual_seed(0))
    whole = g.decode(model, z)
    assert memory.decode_rows(model, 64, 64, 5, None) == 5
    # memory enough for the sampling and two decoded at a time, not for all eight at once
    need = max(memory.sampling_bytes(model, 512, 512, 8), memory.decode_bytes(model, 512, 512, 8, 2))
    free = int(need / memory.HEADROOM * 1.01)
    assert memory.decode_bytes(model, 512, 512, 8) > memory.HEADROOM * free
    plan = memory.plan(model, 512, 512, 8, available=free)
    assert 2 <= plan.rows < 8 and plan.fits and "VAE slicing" in "\n".join(plan.lines())
    monkeypatch.setattr(memory, "decode_rows", lambda *args: 2)
    assert torch.equal(g.decode(model, z), whole)
    one = g.decode(model, z[:1])
    assert torch.equal(one, whole[:1])


def test_vae_tiling_is_picked_when_decoding_whole_would_not_fit_and_recorded(tmp_path, monkeypatch):
    """Memory for sampling 256 x 256 but not for the VAE decoding it whole: the plan picks VAE tiling (the
    largest tile that fits) and says so; the image is made, warns, records "VAE tile", and --from repeats the
    tiles on a machine with memory to spare (the same pixels); the tiled pixels stay close to a whole decode."""
    import numpy as np
    from PIL import Image

    from imagine.io.model_folder import load_model_folder
    from imagine.pipelines import memory
    from imagine.weights import DEFAULT_MODEL

    model = load_model_folder(DEFAULT_MODEL)
    need = max(memory.sampling_bytes(model, 256, 256, 1), memory.decode_bytes(model, 256, 256, 1, 2, 128))
    free = int(need / memory.HEADROOM * 1.01)
    assert memory.decode_bytes(model, 256, 256, 1, 2) > memory.HEADROOM * free  # whole: does not fit
    plan = memory.plan(model, 256, 256, 1, available=free)
    assert plan.fits and plan.picked and plan.vae_tile in memory.VAE_TILES and plan.vae_tile < 256
    assert "VAE tiling, as the whole would not fit" in "\n".join(plan.lines())
    assert memory.plan(model, 256, 256, 1, available=8 * 2**30).vae_tile is None  # room: whole

    monkeypatch.setattr(g, "available_memory", lambda: free)
    args = ("generate", "a red circle", "--width", "256", "--height", "256", "--steps", "3")
    shown = _invoke(*args, "--plan")
    assert "VAE tiling" in shown.stdout and "fits" in shown.stdout, shown.stdout
    tiled = _invoke(*args, "--out", str(tmp_path / "tiled"))
    assert tiled.exit_code == 0, tiled.output
    assert "VAE tiles" in tiled.stderr
    png = next((tmp_path / "tiled").glob("*.png"))
    assert f"VAE tile: {plan.vae_tile}" in Image.open(png).text["parameters"]
    monkeypatch.setattr(g, "available_memory", lambda: 8 * 2**30)
    again = _invoke("generate", "--from", str(png), "--out", str(tmp_path / "again"))
    assert again.exit_code == 0, again.output
    pixels = np.asarray(Image.open(png)).astype(float)
    assert np.array_equal(np.asarray(Image.open(next((tmp_path / "again").glob("*.png")))), pixels)
    whole = _invoke(*args, "--out", str(tmp_path / "whole"))
    assert whole.exit_code == 0 and "VAE tile" not in Image.open(next((tmp_path / "whole").glob("*.png"))).text[
        "parameters"]
    mse = ((np.asarray(Image.open(next((tmp_path / "whole").glob("*.png")))) - pixels) ** 2).mean()
    assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 25  # PSNR: a tiled decode is close to a whole one
