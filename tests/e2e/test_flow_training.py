"""Flow matching trains through the same loop as every other objective: `imagine train --prediction flow`
learns, records what it is, resumes exactly, and its model samples with every sampler through the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from imagine.io.model_folder import load_model_folder
from imagine.train.loop import read_log
from tests.e2e.inprocess import imagine

TRAIN = ["train", "--data", "builtin:digits", "--preset", "tiny", "--sample-every", "0", "--prediction", "flow"]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "m"
    run = imagine(*TRAIN, "--out", out, "--steps", 30, "--flow-shift", 2.0, "--checkpoint-every", 15)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def test_flow_training_learns_and_records_what_it_is(flow_run):
    losses = [r["loss"] for r in read_log(flow_run / "log.jsonl")]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    spec = json.loads((flow_run / "diffusion.json").read_text())
    assert spec["prediction"] == "flow" and spec["flow_shift"] == 2.0


def test_a_flow_run_resumes_exactly(flow_run, tmp_path):
    out = tmp_path / "r"
    assert imagine(*TRAIN, "--out", out, "--steps", 15, "--flow-shift", 2.0, "--checkpoint-every", 15).returncode == 0
    resumed = imagine(*TRAIN, "--out", out, "--steps", 30, "--flow-shift", 2.0, "--checkpoint-every", 15,
                      "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_model_folder(flow_run).unet.state_dict()
    b = load_model_folder(out).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "euler_a", "unipc"])
def test_a_flow_model_samples_with_any_sampler(flow_run, tmp_path, sampler):
    run = imagine("sample", "--model", flow_run, "--n", 2, "--steps", 4, "--sampler", sampler, "--class", 3,
                  "--cfg", 2.0, "--out", tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    from PIL import Image

    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2
    pixels = np.asarray(Image.open(pngs[0]))
    assert pixels.std() > 5  # an image, not a flat field or NaNs


def test_flow_refuses_what_it_cannot_take(tmp_path):
    run = imagine(*TRAIN, "--out", tmp_path / "x", "--steps", 2, "--min-snr-gamma", 5)
    assert run.returncode != 0 and "min_snr_gamma" in run.stderr
    run = imagine(*TRAIN, "--out", tmp_path / "y", "--steps", 2, "--flow-density", "gaussian")
    assert run.returncode != 0 and "flow density 'gaussian' unknown" in run.stderr
