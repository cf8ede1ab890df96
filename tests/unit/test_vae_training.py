"""The VAE's decoder stage: the encoder (the latent space a UNet was trained on) stays exactly as stage 1
left it, the decoder trains on, and a run cut short in either stage resumes to the same weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from imagine.data.shapes import ShapesDataset
from imagine.io.networks import load_vae
from imagine.train.checkpoint import checkpoint_step, latest_checkpoint
from imagine.train.vae import VAE_PRESETS, train_vae

CFG = replace(VAE_PRESETS["vae-tiny"], steps=4, decoder_steps=4, checkpoint_every=2, batch_size=4)


class Stop(Exception):
    pass


def _stop_at(n):
    def hook(info, context):
        if info.step == n:
            raise Stop
    return hook


def _encoder_side(state):
    return {k: v for k, v in state.items() if k.startswith(("encoder.", "quant_conv."))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    data = ShapesDataset(16)
    stage1 = train_vae(replace(CFG, decoder_steps=0), data, root / "stage1")
    full = train_vae(CFG, data, root / "full")
    return root, data, load_vae(stage1), load_vae(full)


def test_decoder_stage_keeps_the_latent_space_and_trains_the_decoder(runs):
    _, _, stage1, full = runs
    a, b = stage1.state_dict(), full.state_dict()
    for key, value in _encoder_side(a).items():
        assert torch.equal(value, b[key]), key
    decoder = [k for k in a if k.startswith(("decoder.", "post_quant_conv."))]
    assert decoder and all(not torch.equal(a[k], b[k]) for k in decoder if k.endswith(".weight"))
    # same encoder, same latent statistics: the scaling a UNet was trained with still holds
    assert full.config.scaling_factor == stage1.config.scaling_factor
    assert full.config.shift_factor == stage1.config.shift_factor


@pytest.mark.parametrize("cut", [3, 7])  # in stage 1 (resumes from 2), in stage 2 (resumes from 6)
def test_a_run_cut_short_resumes_to_the_same_weights(runs, cut):
    root, data, _, full = runs
    out = root / f"cut{cut}"
    with pytest.raises(Stop):
        train_vae(CFG, data, out, hooks=(_stop_at(cut),))
    assert checkpoint_step(latest_checkpoint(out / "checkpoints")) == cut - 1
    resumed = load_vae(train_vae(CFG, data, out, resume=True))
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
