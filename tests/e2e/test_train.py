"""Training as a user runs it: the tiny preset learns, a killed run resumes exactly, DDP works."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.train.loop import read_log
from tests.e2e.inprocess import imagine

TRAIN = [sys.executable, "-m", "imagine", "train", "--data", "builtin:digits", "--preset", "tiny",
         "--sample-every", "0"]


def _run(args, **kwargs):
    """`python -m imagine ...` in-process (tests/e2e/inprocess.py); anything else (torchrun, a set environment)
    as a real process."""
    if args[:3] == [sys.executable, "-m", "imagine"] and not kwargs:
        return imagine(*args[3:])
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


def test_tiny_preset_learns_in_seconds(tmp_path):
    start = time.perf_counter()
    out = _run([*TRAIN, "--out", str(tmp_path / "m"), "--steps", "40"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert time.perf_counter() - start < 120
    losses = [r["loss"] for r in read_log(tmp_path / "m" / "log.jsonl")]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    for name in ("diffusion.json", "unet/model.safetensors", "loss.png"):
        assert (tmp_path / "m" / name).exists()


def test_killed_run_resumes_with_the_same_losses(tmp_path):
    """SIGKILL a run after its second checkpoint; --resume must reproduce the uninterrupted run's losses and
    final weights. They come out bit-identical in practice; the assertion allows 1e-6 relative so that a
    CPU kernel's reduction order cannot make CI flaky, while any real resume bug (optimizer state, RNG,
    EMA count, data position) moves losses by ~1e-2."""
    steps = ["--steps", "30", "--checkpoint-every", "10"]
    full = _run([*TRAIN, "--out", str(tmp_path / "full"), *steps])
    assert full.returncode == 0, full.stderr[-2000:]
    victim = tmp_path / "victim"
    proc = subprocess.Popen([*TRAIN, "--out", str(victim), *steps], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = victim / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text() == "step_0000020"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists(), "the run never wrote a checkpoint"
    # the kill landed mid-run: the process died of it, and the run had not finished
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (exit {proc.returncode}) before the kill"
    logged = [r["step"] for r in read_log(victim / "log.jsonl")]
    assert 20 <= max(logged) < 30, logged
    assert not (victim / "unet" / "model.safetensors").exists()  # no final weights yet
    resumed = _run([*TRAIN, "--out", str(victim), *steps, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = read_log(tmp_path / "full" / "log.jsonl"), read_log(victim / "log.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, 31))  # every step once
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in expected], rtol=1e-6, atol=0)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "unet" / "model.safetensors")
    b = load_file(victim / "unet" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-8, msg=lambda m, n=name: f"{n}: {m}")


def test_resume_with_more_steps_trains_on(tmp_path):
    out = tmp_path / "m"
    assert _run([*TRAIN, "--out", str(out), "--steps", "10"]).returncode == 0
    more = _run([*TRAIN, "--out", str(out), "--steps", "15", "--resume"])
    assert more.returncode == 0, more.stderr[-2000:]
    assert [r["step"] for r in read_log(out / "log.jsonl")] == list(range(1, 16))
    nothing = _run([*TRAIN, "--out", str(tmp_path / "empty"), "--resume"])
    assert nothing.returncode != 0 and "no checkpoint" in nothing.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
@pytest.mark.slow  # over 10 s here: `pytest -m slow` runs it (CI's suite stays under 10 minutes)
def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    """Each sample's draws depend on its global index, not its process: two processes with half the batch
    each follow the single-process run up to float summation order."""
    args = ["-m", "imagine", "train", "--data", "builtin:digits", "--preset", "tiny", "--sample-every", "0",
            "--steps", "6", "--batch-size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = _run(["torchrun", "--standalone", "--nproc_per_node=2", *args, "--out", str(tmp_path / "ddp")], env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = _run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    a = [r["loss"] for r in read_log(tmp_path / "ddp" / "log.jsonl")]
    b = [r["loss"] for r in read_log(tmp_path / "one" / "log.jsonl")]
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_sample_image_i_equals_a_single_run_with_seed_plus_i(tmp_path):
    model = tmp_path / "m"
    assert _run([*TRAIN, "--out", str(model), "--steps", "5"]).returncode == 0
    common = ["--model", str(model), "--steps", "4", "--sampler", "Euler a", "--class", "7", "--cfg", "2"]
    batch = _run([sys.executable, "-m", "imagine", "sample", *common, "--n", "3", "--seed", "10",
                  "--out", str(tmp_path / "batch")])
    assert batch.returncode == 0, batch.stderr[-2000:]
    alone = _run([sys.executable, "-m", "imagine", "sample", *common, "--n", "1", "--seed", "11",
                  "--out", str(tmp_path / "alone")])
    assert alone.returncode == 0, alone.stderr[-2000:]
    a = np.asarray(Image.open(tmp_path / "batch" / "000011_class7.png"))
    b = np.asarray(Image.open(tmp_path / "alone" / "000011_class7.png"))
    assert a.shape == (16, 16) and np.array_equal(a, b)
    again = _run([sys.executable, "-m", "imagine", "sample", *common, "--n", "1", "--seed", "11",
                  "--out", str(tmp_path / "alone")])
    assert "000011_class7-1.png" in again.stdout  # never overwrites
    from imagine.a1111 import parse_a1111
    from imagine.io.png import read_png_metadata

    text, record = read_png_metadata(tmp_path / "batch" / "000011_class7.png")
    p = parse_a1111(text)
    assert p["Prompt"] == "class 7" and p["Seed"] == "11" and p["Sampler"] == "Euler a" and p["CFG scale"] == "2"
    assert record["kind"] == "sample" and record["class"] == 7 and record["settings"]["seed"] == 11


def test_bad_input_is_refused_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = _run([sys.executable, "-m", "imagine", "train", "--data", str(empty), "--out", str(tmp_path / "o"),
                "--preset", "tiny"])
    assert out.returncode == 2 and "holds no images" in out.stderr
    out = _run([sys.executable, "-m", "imagine", "sample", "--model", str(empty)])
    assert out.returncode == 2 and "diffusion.json" in out.stderr
    out = _run([*TRAIN, "--out", str(tmp_path / "o"), "--preset", "huge"])
    assert out.returncode == 2 and "preset 'huge' unknown" in out.stderr


def test_vae_then_latent_diffusion(tmp_path):
    vae = tmp_path / "vae"
    out = _run([sys.executable, "-m", "imagine", "train-vae", "--data", "builtin:digits", "--out", str(vae),
                "--preset", "vae-tiny", "--channels", "1"])
    assert out.returncode == 0, out.stderr[-2000:]
    losses = [r["loss"] for r in read_log(vae / "log.jsonl")]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    from imagine.io.networks import load_vae

    cfg = load_vae(vae).config
    assert cfg.scaling_factor != 0.18215  # measured from the data, not SD's constant
    model = tmp_path / "latent"
    out = _run([*TRAIN, "--out", str(model), "--steps", "8", "--vae", str(vae)])
    assert out.returncode == 0, out.stderr[-2000:]
    assert (model / "vae" / "model.safetensors").exists()
    out = _run([sys.executable, "-m", "imagine", "sample", "--model", str(model), "--n", "2", "--steps", "3",
                "--class", "1", "--out", str(tmp_path / "s")])
    assert out.returncode == 0, out.stderr[-2000:]
    assert np.asarray(Image.open(tmp_path / "s" / "000000_class1.png")).shape == (16, 16)
    bad = _run([*TRAIN, "--out", str(tmp_path / "bad"), "--vae", str(vae), "--image-size", "15"])
    assert bad.returncode == 2 and "multiple of the VAE's factor" in bad.stderr


def test_init_fine_tunes_a_trained_model_keeping_what_it_was_trained_as(tiny_t2i_dir, tmp_path):
    """--init starts from the model's weights (a vanishing learning rate leaves them where they were), keeps its
    parametrization and VAE whatever the preset says, and records where it started; foreign starts are refused."""
    from dataclasses import replace

    from imagine.io.checkpoint import CheckpointError
    from imagine.io.model_folder import load_model_folder
    from imagine.io.networks import load_unet
    from imagine.train.checkpoint import export_model
    from imagine.train.config import preset
    from imagine.train.recipe import fine_tune_config, train_model

    cfg = replace(preset("tiny-t2i"), steps=2, lr=1e-12, prediction="eps", schedule="linear", checkpoint_every=1,
                  sample_every=0)
    out = tmp_path / "tuned"
    train_model(cfg, "builtin:shapes-language", out, init=tiny_t2i_dir, log=lambda _: None)
    base, tuned = load_model_folder(tiny_t2i_dir), load_model_folder(out)
    assert tuned.spec == base.spec  # v-prediction and its schedule, though the preset said eps and linear
    for (name, a), b in zip(base.unet.state_dict().items(), tuned.unet.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    for a, b in zip(base.vae.state_dict().values(), tuned.vae.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # its own VAE
    from safetensors import safe_open

    from imagine.train.checkpoint import latest_checkpoint

    with safe_open(latest_checkpoint(out / "checkpoints") / "training_state.safetensors", "pt") as f:
        assert json.loads(f.metadata()["state"])["init"] == str(tiny_t2i_dir)
    # resumed without --init, it goes on from the model it started from (not the preset's eps and a new VAE)
    train_model(replace(cfg, steps=3), "builtin:shapes-language", out, resume=True, log=lambda _: None)
    assert load_model_folder(out).spec == base.spec and not (out / "vae_training").exists()
    # imagine export: the final model, or the EMA of any checkpoint kept (the VAE is beside them from the start)
    assert (out / "vae").is_dir()
    for step, source in ((None, out / "unet"), (2, out / "checkpoints" / "step_0000002" / "ema")):
        dest = tmp_path / f"export-{step}"
        if step is None:
            export_model(out, dest)
        else:
            run = _run([sys.executable, "-m", "imagine", "export", str(out), str(dest), "--step", str(step)])
            assert run.returncode == 0, run.stderr[-2000:]
        exported, want = load_model_folder(dest), load_unet(source)
        assert exported.spec == base.spec and exported.vae is not None
        for (name, a), b in zip(want.state_dict().items(), exported.unet.state_dict().values(), strict=True):
            torch.testing.assert_close(b, a.half().float(), atol=0, rtol=0, msg=name)  # fp16 by default
    with pytest.raises(CheckpointError, match="no checkpoint at step 7; it keeps 2, 3"):
        export_model(out, tmp_path / "e7", step=7)
    assert not (tmp_path / "e7").exists()
    # without --init the same settings start from scratch: far from the model
    scratch = tmp_path / "scratch"
    train_model(cfg, "builtin:shapes", scratch, vae=tiny_t2i_dir / "vae", log=lambda _: None)
    first = next(iter(base.unet.state_dict()))
    assert not torch.allclose(load_unet(scratch / "unet").state_dict()[first], base.unet.state_dict()[first])

    with pytest.raises(CheckpointError, match="not a model folder"):
        train_model(cfg, "builtin:shapes", tmp_path / "x", init=tmp_path / "missing", log=lambda _: None)
    for other in (replace(base.spec, upscale=4, noise_levels=10), replace(base.spec, consistency=True)):
        with pytest.raises(ValueError, match="have their own trainers"):
            fine_tune_config(cfg, other)
    with pytest.raises(ValueError, match="pixel-space model"):
        pixel = tmp_path / "pixel"
        train_model(replace(preset("tiny"), steps=1), "builtin:digits", pixel, log=lambda _: None)
        train_model(preset("tiny"), "builtin:digits", tmp_path / "y", init=pixel, vae=tiny_t2i_dir / "vae",
                    log=lambda _: None)
    bad = _run([sys.executable, "-m", "imagine", "train", "--preset", "tiny-t2i", "--data", "builtin:shapes", "--out",
                str(tmp_path / "z"),
                "--init", str(tmp_path / "missing")])
    assert bad.returncode != 0 and "not a model folder" in bad.stderr
    assert not (tmp_path / "z").exists()
