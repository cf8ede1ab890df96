"""`imagine convert` for the transformer families, both ways: SD3, Flux.1 and PixArt models written as diffusers
folders that diffusers' own pipelines load (their transformer's tensors equal ours) and that read back to the
very pixels; Flux written as ComfyUI's all-in-one single file, bit for bit again on a second round; PixArt's
single file refused by name (no tool reads one)."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers
from safetensors.torch import load_file

from imagine.io.stable_diffusion import load_single_file, save_diffusers_pipeline, save_single_file
from imagine.pipelines import generate as g
from imagine.pipelines.request import load_text_model
from tests.tiny_sd import write_flux, write_pixart, write_sd3

PROMPT = "a red circle above a blue square"
WRITERS = {"sd3": (lambda f: write_sd3(f), "StableDiffusion3Pipeline"),
           "flux": (lambda f: write_flux(f, dev=True), "FluxPipeline"),
           "pixart": (lambda f: write_pixart(f, sigma=True), "PixArtSigmaPipeline")}


def _settings(arch: str) -> g.Settings:
    return g.Settings(prompt=PROMPT, negative_prompt="blurry", steps=2, sampler="euler", seed=5, width=16, height=16,
                      cfg_scale=1.0 if arch == "flux" else 4.0)


@pytest.mark.parametrize("arch", list(WRITERS))
def test_diffusers_folders_of_the_transformer_families(arch, tmp_path):
    write, pipeline = WRITERS[arch]
    write(tmp_path / "pipe")
    model, encoder = load_text_model(tmp_path / "pipe")
    out = save_diffusers_pipeline(model, tmp_path / "out")
    theirs = getattr(diffusers, pipeline).from_pretrained(out)  # diffusers reads our folder as its own
    ours = model.unet.state_dict()
    assert theirs.transformer.state_dict().keys() == ours.keys()
    assert all(torch.equal(theirs.transformer.state_dict()[k], ours[k]) for k in ours)
    back, back_encoder = load_text_model(out)
    assert back.arch == model.arch and back.spec.prediction == model.spec.prediction
    s = _settings(arch)
    assert torch.equal(g.txt2img(back, s, back_encoder), g.txt2img(model, s, encoder))
    again = save_diffusers_pipeline(back, tmp_path / "again")
    for part in (model.family.denoiser_folder, "vae"):
        first, second = (load_file(str(f / part / "diffusion_pytorch_model.safetensors")) for f in (out, again))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_flux_single_file_both_ways(tmp_path):
    write_flux(tmp_path / "pipe", dev=True, inferable=True)
    model, encoder = load_text_model(tmp_path / "pipe")
    out = save_single_file(model, tmp_path / "flux-aio.safetensors")
    shutil.copytree(tmp_path / "pipe" / "tokenizer_2", tmp_path / "tokenizer_2")  # no single file carries T5's
    loaded = load_single_file(out)
    assert loaded.arch == "flux" and loaded.spec.distilled_guidance and loaded.module_paths == []
    s = _settings("flux")
    assert torch.equal(g.txt2img(loaded, s, loaded.text_encoder), g.txt2img(model, s, encoder))
    written = load_file(str(out))
    assert any(k.startswith("model.diffusion_model.double_blocks.0.img_attn.qkv") for k in written)
    again = load_file(str(save_single_file(loaded, tmp_path / "again.safetensors")))
    assert again.keys() == written.keys() and all(torch.equal(again[k], written[k]) for k in written)


def test_pixart_has_no_single_file(tmp_path):
    write_pixart(tmp_path / "pipe", sigma=False)
    model, _ = load_text_model(tmp_path / "pipe")
    with pytest.raises(Exception, match="write a diffusers folder"):
        save_single_file(model, tmp_path / "pixart.safetensors")


def test_the_checkpoint_merger_takes_the_transformer_families(tmp_path):
    """A1111's weighted sum over two Flux models (transformer, VAE, CLIP-L and T5) written as a folder of A's kind:
    every tensor is the mix, and the result serves like any Flux folder."""
    from imagine.train.merge import merge_files

    write_flux(tmp_path / "a", seed=0)
    write_flux(tmp_path / "b", seed=1)
    out = merge_files([tmp_path / "a", tmp_path / "b"], tmp_path / "ab", multiplier=0.25)
    merged, a, b = (load_text_model(p)[0] for p in (out, tmp_path / "a", tmp_path / "b"))
    for part in ("unet", "vae"):
        mine, x, y = (getattr(m, part).state_dict() for m in (merged, a, b))
        assert all(torch.allclose(mine[k], 0.75 * x[k] + 0.25 * y[k], atol=1e-6) for k in mine)
    t5s = [m.text_encoder.t5.model.state_dict() for m in (merged, a, b)]
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert torch.allclose(t5s[0][key], 0.75 * t5s[1][key] + 0.25 * t5s[2][key], atol=1e-6)
    assert g.txt2img(merged, _settings("flux"), merged.text_encoder).isfinite().all()
