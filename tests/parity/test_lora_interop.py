"""LoRA files between imagine and diffusers/PEFT (test-only oracles), on a tiny random SD 1.x pipeline:
a LoRA imagine writes (PEFT or kohya layout) loads with diffusers' load_lora_weights and gives the same
UNet output, and one made with PEFT and saved by diffusers loads in imagine with the same output."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from imagine.adapters.lora import attach, create, parts_of
from imagine.io.lora_keys import load_lora, save_lora
from imagine.pipelines.request import load_text_model
from tests.tiny_sd import write_pipeline

TOL = 1e-4


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([30.0, 800.0]), torch.randn(2, 77, 32, generator=g)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_imagine_lora_loads_in_diffusers(fmt, tmp_path):
    pipe = write_pipeline("sd1", tmp_path / "pipe")
    model, encoder = load_text_model(tmp_path / "pipe")
    parts = parts_of(model, encoder)
    lora = create(parts, rank=2, alpha=4.0, targets="attn")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=g) * 0.2)
    save_lora(lora, tmp_path / "lora.safetensors", fmt)
    x, t, ctx = _inputs()
    handle = attach(parts, [(lora, 1.0)])
    with torch.no_grad():
        ours = model.unet(x, t, ctx)
    handle.detach()
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    with torch.no_grad():
        theirs = pipe.unet(x, t, ctx).sample
        base = model.unet(x, t, ctx)
    assert (ours - base).abs().max() > 1e-2  # the LoRA does something
    assert (ours - theirs).abs().max().item() <= TOL


def test_peft_lora_saved_by_diffusers_loads_in_imagine(tmp_path):
    pipe = write_pipeline("sd1", tmp_path / "pipe")
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "out", unet_lora_layers=layers, safe_serialization=True)
    model, encoder = load_text_model(tmp_path / "pipe")
    parts = parts_of(model, encoder)
    lora = load_lora(tmp_path / "out" / "pytorch_lora_weights.safetensors", parts)
    assert len(lora.layers) == len(layers) // 2
    attach(parts, [(lora, 1.0)])
    x, t, ctx = _inputs()
    with torch.no_grad():
        assert (model.unet(x, t, ctx) - pipe.unet(x, t, ctx).sample).abs().max().item() <= TOL
