"""Super-resolution stages: the conditioning acts, the augmentation level is honoured, training resumes
exactly, and the seeds of a cascade give the same picture at any batch size."""

from __future__ import annotations

import json

import pytest
import torch

from imagine.diffusion.superres import augment, check_noise_level, degrade, upsample
from tests.e2e.inprocess import imagine

_imagine = imagine  # in-process (tests/e2e/inprocess.py)


@pytest.fixture(scope="module")
def sr_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sr") / "tiny-sr"
    run = _imagine("train-sr", "--out", out, "--preset", "tiny-sr", "--from", 16, "--to", 32)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_augmentation_levels_follow_the_schedule():
    ac = torch.linspace(0.99, 0.1, 10)
    up, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    out = augment(up, torch.tensor([0, 1, 10]), noise, ac)
    assert torch.equal(out[0], up[0])  # level 0: untouched
    torch.testing.assert_close(out[1], ac[0].sqrt() * up[1] + (1 - ac[0]).sqrt() * noise[1])
    torch.testing.assert_close(out[2], ac[9].sqrt() * up[2] + (1 - ac[9]).sqrt() * noise[2])
    with pytest.raises(ValueError, match=r"noise levels must lie in 0\.\.10"):
        augment(up, torch.tensor([0, 1, 11]), noise, ac)
    with pytest.raises(ValueError, match=r"outside this stage's trained range 0\.\.19"):
        check_noise_level(20, 20)
    x = torch.rand(1, 3, 8, 12) * 2 - 1
    assert degrade(x, 4).shape == (1, 3, 2, 3) and upsample(degrade(x, 4), (8, 12)).shape == x.shape
    with pytest.raises(ValueError, match="does not shrink evenly by 3"):
        degrade(x, 3)


def test_native_share_mixes_the_scene_drawn_small_with_the_degraded_target():
    """sr_native: that share of pairs takes the scene drawn small by the renderer, the rest the target degraded;
    the choice is per sample and repeats (resume), and without it the old draws are unchanged."""
    from imagine.data.shapes import ShapesDataset
    from imagine.train.config import PRESETS
    from imagine.train.loop import sr_pairs

    data = ShapesDataset(size=32)
    idx = list(range(40))
    images, _, _ = data.batch(idx)
    natives = data.render_at(idx, 8)
    assert natives.shape == (40, 3, 8, 8) and not torch.equal(natives, degrade(images, 4))
    cfg = PRESETS["tiny-sr"].with_overrides(image_size=32, sr_scale=4, sr_crop=0, noise_levels=1,
                                            default_noise_level=0)  # level 0 only: inputs untouched
    ac = torch.linspace(0.99, 0.1, 10)
    degraded, native = upsample(degrade(images, 4), (32, 32)), upsample(natives, (32, 32))
    _, lows, _ = sr_pairs(cfg, images, idx, ac)
    assert torch.equal(lows, degraded)
    _, lows, _ = sr_pairs(cfg.with_overrides(sr_native=1.0), images, idx, ac, natives)
    assert torch.equal(lows, native)
    mixed = cfg.with_overrides(sr_native=0.5)
    _, lows, _ = sr_pairs(mixed, images, idx, ac, natives)
    picked = [torch.equal(lows[i], native[i]) for i in idx]
    assert all(picked[i] or torch.equal(lows[i], degraded[i]) for i in idx) and 10 < sum(picked) < 30
    assert torch.equal(sr_pairs(mixed, images, idx, ac, natives)[1], lows)
    with pytest.raises(ValueError, match="draw its scenes small"):
        sr_pairs(mixed, images, idx, ac)
    with pytest.raises(ValueError, match="sr_native is a share"):
        cfg.with_overrides(sr_native=1.5)


def test_stage_sees_the_low_resolution_image_and_its_level(sr_dir):
    """The network's output moves with the low-resolution input (a zero image is not a real one) and with the
    augmentation level; the pipeline records the level it used and refuses one outside the trained range."""
    from imagine.io.model_folder import load_model_folder
    from imagine.models.text_encoders import default_text_encoder
    from imagine.pipelines.generate import Settings
    from imagine.pipelines.upscale import sr_stage

    model = load_model_folder(sr_dir)
    assert model.spec.upscale == 2 and model.spec.noise_levels == 20
    unet = model.unet.eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([500.0, 500.0])
    text = default_text_encoder().encode(["a red circle", "a red circle"])
    real = upsample(degrade(torch.rand(2, 3, 16, 16) * 2 - 1, 2), (16, 16))
    levels = torch.tensor([0, 0])

    def run(low, lv):
        with torch.no_grad():
            return unet(torch.cat([x, low], 1), t, text.context, class_labels=lv, encoder_attention_mask=text.mask)

    assert (run(real, levels) - run(torch.zeros_like(real), levels)).abs().max() > 1e-4
    assert (run(real, levels) - run(real, torch.tensor([15, 15]))).abs().max() > 1e-4
    low = torch.rand(1, 3, 8, 8) * 2 - 1
    s = Settings(prompt="a red circle", steps=2, cfg_scale=1.0, seed=4)
    a = sr_stage(model, low, s, default_text_encoder(), noise_level=0)
    b = sr_stage(model, low, s, default_text_encoder(), noise_level=19)
    assert a.shape == (1, 3, 16, 16) and (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"trained range 0\.\.19"):
        sr_stage(model, low, s, default_text_encoder(), noise_level=20)


def test_cascade_seeds_do_not_depend_on_the_batch(sr_dir, tiny_t2i_dir):
    """The same seed gives the same upscaled picture whatever the batch, through a stage run twice (2x stage,
    4x asked: the last stage repeats, as A1111 repeats an upscaler's passes)."""
    from imagine.pipelines.generate import Settings, txt2img
    from imagine.pipelines.request import load_text_model
    from imagine.pipelines.upscale import enlarge, resolve_upscaler

    base, encoder = load_text_model(tiny_t2i_dir)
    upscaler = resolve_upscaler(str(sr_dir))
    s = Settings(prompt="a blue square", steps=2, cfg_scale=3.0, seed=7, n=3)
    batch = enlarge(txt2img(base, s, encoder), (64, 64), upscaler, s, encoder)
    assert batch.shape == (3, 3, 64, 64)
    for i in (0, 2):
        one = Settings(prompt="a blue square", steps=2, cfg_scale=3.0, seed=7 + i, n=1)
        alone = enlarge(txt2img(base, one, encoder), (64, 64), upscaler, one, encoder)
        assert torch.equal(batch[i], alone[0]), f"image {i} of the cascade's batch differs from its seed alone"


def test_sr_training_resumes_exactly_and_cascades_train_in_order(tmp_path):
    whole = tmp_path / "whole"
    run = _imagine("train-sr", "--out", whole, "--preset", "tiny-sr", "--from", 8, "--to", 32, "--stages", "8,16,32",
                   "--steps", 4, "--checkpoint-every", 2)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((whole / "cascade.json").read_text())
    assert manifest["stages"] == ["stage-8-16", "stage-16-32"] and manifest["sizes"] == [[8, 16], [16, 32]]
    cut = tmp_path / "cut"
    run = _imagine("train-sr", "--out", cut, "--preset", "tiny-sr", "--from", 8, "--to", 32, "--stages", "8,16,32",
                   "--steps", 2, "--checkpoint-every", 2)
    assert run.returncode == 0, run.stderr[-3000:]
    run = _imagine("train-sr", "--out", cut, "--preset", "tiny-sr", "--from", 8, "--to", 32, "--stages", "8,16,32",
                   "--steps", 4, "--checkpoint-every", 2, "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in manifest["stages"]:
        losses = [[r["loss"] for r in map(json.loads, (root / stage / "log.jsonl").read_text().splitlines())]
                  for root in (whole, cut)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-7), stage
    run = _imagine("train-sr", "--out", cut, "--preset", "tiny-sr", "--from", 8, "--to", 32, "--steps", 2)
    assert run.returncode != 0 and "pass --resume" in run.stderr
    run = _imagine("train-sr", "--out", tmp_path / "bad", "--preset", "tiny-sr", "--from", 8, "--to", 20)
    assert run.returncode != 0 and "not a whole factor" in run.stderr


def test_generate_size_runs_the_cascade_and_from_reproduces_it(sr_dir, tiny_t2i_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from imagine.a1111 import parse_a1111
    from imagine.io.png import read_png_metadata

    common = ["--model", tiny_t2i_dir, "--steps", 2, "--seed", 3, "--n", 2]
    run = _imagine("generate", "a red circle", *common, "--size", 32, "--sr", sr_dir, "--out", "a", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    first = tmp_path / "a" / "000004-txt2img.png"
    assert Image.open(first).size == (32, 32)
    text, record = read_png_metadata(first)
    fields = parse_a1111(text)
    assert fields["Size"] == "16x16" and fields["Hires upscale"] == "2" and fields["Hires upscaler"] == str(sr_dir)
    assert "Denoising strength" not in fields  # a cascade has no second pass
    assert record["upscaler"]["kind"] == "sr" and record["upscaler"]["stages"][0]["upscale"] == 2
    run = _imagine("generate", "--from", first, "--out", "b", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "000004-txt2img.png")), np.asarray(Image.open(first)))
    run = _imagine("generate", "x", *common, "--size", 16, "--out", "c", cwd=tmp_path)
    assert run.returncode != 0 and "not larger than the model's 16 px" in run.stderr
    run = _imagine("generate", "x", *common, "--sr", sr_dir, "--out", "c", cwd=tmp_path)
    assert run.returncode != 0 and "add --size" in run.stderr


def test_hires_fix_upscales_then_denoises_and_is_recorded_as_a1111_does(tiny_t2i_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from imagine.a1111 import parse_a1111
    from imagine.io.png import read_png_metadata

    common = ["--model", tiny_t2i_dir, "--steps", 2, "--seed", 1]
    for upscaler in ("Lanczos", "Latent"):
        run = _imagine("generate", "a blue square", *common, "--hires", 2, "--hires-strength", 0.5,
                       "--hires-upscaler", upscaler, "--hires-steps", 3, "--out", upscaler, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        out = tmp_path / upscaler / "000001-txt2img.png"
        assert Image.open(out).size == (32, 32)
        fields = parse_a1111(read_png_metadata(out)[0])
        assert (fields["Hires upscale"], fields["Hires upscaler"], fields["Hires steps"],
                fields["Denoising strength"]) == ("2", upscaler, "3", "0.5")
        run = _imagine("generate", "--from", out, "--out", upscaler + "-again", cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        again = tmp_path / (upscaler + "-again") / "000001-txt2img.png"
        assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    plain = _imagine("generate", "a blue square", *common, "--hires", 2, "--hires-strength", 0, "--out", "p",
                     cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "p" / "000001-txt2img.png")),
                              np.asarray(Image.open(tmp_path / "Lanczos" / "000001-txt2img.png")))
    for bad, message in ((["--hires", 9], "hires scale must lie in [1, 8]"),
                         (["--hires", 2, "--hires-upscaler", "ESRGAN_4x"], "upscaler 'ESRGAN_4x' unknown"),
                         (["--hires", 2, "--hires-strength", 0, "--hires-upscaler", "Latent"], "needs a second pass")):
        run = _imagine("generate", "x", *common, *bad, "--out", "bad", cwd=tmp_path)
        assert run.returncode != 0 and message in run.stderr, run.stderr[-1000:]


def test_upscale_command_keeps_the_parameters_and_redoes_itself(sr_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from imagine.a1111 import parse_a1111
    from imagine.io.png import read_png_metadata

    picture = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)).save(picture)
    run = _imagine("upscale", picture, "--scale", 2, "--upscaler", sr_dir, "--prompt", "a red circle",
                   "--noise-level", 3, "--out", "a", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "a" / "000000-upscale.png"
    assert Image.open(out).size == (20, 24)
    text, record = read_png_metadata(out)
    fields = parse_a1111("\nSteps: 0, " + text)  # no generation fields of its own: the postprocessing line alone
    assert fields["Postprocess upscale by"] == "2" and fields["Postprocess SR noise level"] == "3"
    assert record["kind"] == "upscale" and record["input"]["path"] == str(picture.resolve())
    run = _imagine("upscale", "--from", out, "--out", "b", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "000000-upscale.png")), np.asarray(Image.open(out)))
    run = _imagine("upscale", out, "--scale", 1.5, "--upscaler", "Bicubic", "--out", "c", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    again = tmp_path / "c" / "000000-upscale.png"
    assert Image.open(again).size == (30, 36)
    assert read_png_metadata(again)[0].startswith(text + ", Postprocess upscale by: 1.5")  # A1111's text kept
    for bad, message in ((["--scale", 20, "--upscaler", "Lanczos"], "must lie in [1, 16]"),
                         (["--upscaler", "Latent"], "belongs to hires fix"),
                         (["--upscaler", sr_dir, "--noise-level", 99], "trained range")):
        run = _imagine("upscale", picture, *bad, "--out", "bad", cwd=tmp_path)
        assert run.returncode != 0 and message in run.stderr, run.stderr[-1000:]
    Image.new("RGB", (4, 4)).save(picture)  # the input changed: --from refuses
    run = _imagine("upscale", "--from", out, "--out", "d", cwd=tmp_path)
    assert run.returncode != 0 and "has changed" in run.stderr


@pytest.mark.slow  # over 10 s here: `pytest -m slow` runs it (CI's suite stays under 10 minutes)
def test_shipped_stage_upscales_and_its_tiles_leave_no_seam():
    """The shipped 4x stage upscales a scene it never saw to near the truth (how it compares with Lanczos is
    benchmarks/sr_quality.py's business), and tiles that cut the output up give nearly the same picture
    (exactly the whole-image one where a tile covers it all)."""
    from PIL import Image
    from skimage.metrics import peak_signal_noise_ratio

    from imagine.data.shapes import make_scene, render
    from imagine.models.text_encoders import default_text_encoder
    from imagine.pipelines.generate import Settings
    from imagine.pipelines.upscale import enlarge, from_pil, resample, resolve_upscaler, to_pil
    from imagine.weights import SR_MODEL

    if not (SR_MODEL / "diffusion.json").exists():
        pytest.skip("the SR stage is not shipped in this checkout")
    up = resolve_upscaler(SR_MODEL.name)
    scene = make_scene(10**8 + 7)
    truth = torch.from_numpy(render(scene, 128).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    low = from_pil([Image.fromarray(render(scene, 32))])
    encoder = default_text_encoder()
    s = Settings(prompt=scene.caption, seed=0, steps=8)

    def psnr(a, b):
        to8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()[0]  # noqa: E731
        return peak_signal_noise_ratio(to8(b), to8(a), data_range=255)

    whole = enlarge(low, (128, 128), up, s, encoder)
    lanczos = from_pil(resample(to_pil(low), (128, 128), "Lanczos"))
    assert whole.shape == (1, 3, 128, 128) and psnr(whole, truth) > 26 and psnr(lanczos, truth) > 26
    assert torch.equal(enlarge(low, (128, 128), up, replace_tile(s, 128), encoder), whole)
    tiled = enlarge(low, (128, 128), up, replace_tile(s, 64), encoder)
    assert psnr(tiled, whole) > 25  # the seams themselves: tests/unit/test_tiled.py


def replace_tile(s, tile):
    from dataclasses import replace

    return replace(s, tile=tile)
