"""The checkpoint merger: A1111's formulas on every tensor of the UNet, VAE and text encoders, and a refusal
naming the mismatched tensors when the architectures differ."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
from imagine.io.checkpoint import CheckpointError
from imagine.pipelines.request import load_text_model
from imagine.train.merge import merge_models
from tests.tiny_sd import write_pipeline


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    for seed in range(3):
        write_pipeline("sd1", root / f"m{seed}", seed=seed)
    write_pipeline("sdxl", root / "xl")
    return root


def _tensors(model):
    return {"unet": model.unet.conv_in.weight.clone(), "vae": model.vae.decoder.conv_out.weight.clone(),
            "text": next(model.text_encoder.model.parameters()).clone()}


def test_weighted_sum_and_add_difference_follow_a1111(three):
    a, b, c = (load_text_model(three / f"m{i}")[0] for i in range(3))
    ta, tb, tc = _tensors(a), _tensors(b), _tensors(c)
    merge_models(a, b, mode="weighted-sum", multiplier=0.3)
    for key, value in _tensors(a).items():
        assert torch.allclose(value, ta[key] * 0.7 + tb[key] * 0.3, atol=1e-7), key
    a = load_text_model(three / "m0")[0]
    merge_models(a, b, c, mode="add-difference", multiplier=0.5)
    for key, value in _tensors(a).items():
        assert torch.allclose(value, ta[key] + (tb[key] - tc[key]) * 0.5, atol=1e-6), key
    with pytest.raises(ValueError, match="add-difference takes three models"):
        merge_models(a, b, mode="add-difference")


def test_different_architectures_are_refused_by_name(three):
    a, xl = load_text_model(three / "m0")[0], load_text_model(three / "xl")[0]
    with pytest.raises(CheckpointError, match=r"different parts|do not match"):
        merge_models(a, xl)


def test_merge_cli_writes_a_loadable_single_file(three, tmp_path):
    out = tmp_path / "merged.safetensors"
    run = subprocess.run([sys.executable, "-m", "imagine", "merge", str(three / "m0"), str(three / "m1"),
                          "--multiplier", "0.25", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    merged = load_text_model(out)[0]
    a, b = load_text_model(three / "m0")[0], load_text_model(three / "m1")[0]
    expected = a.unet.conv_in.weight * 0.75 + b.unet.conv_in.weight * 0.25
    assert torch.allclose(merged.unet.conv_in.weight, expected, atol=1e-7)
