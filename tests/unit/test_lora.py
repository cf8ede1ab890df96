"""LoRA: B starts at zero, weight 0 and detach leave the base bit for bit, merging equals the unmerged
update, kohya's and PEFT's file layouts round-trip (UNet names diffusers' or the original layout's), and a
LoRA that does not fit the model fails with what did not match."""

from __future__ import annotations

import pytest
import torch

from imagine.adapters.lora import attach, create, merge
from imagine.io.checkpoint import CheckpointError
from imagine.io.lora_keys import load_lora, save_lora
from imagine.models import UNet2DConditionModel, UNetConfig

CONFIG = UNetConfig(sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
                    cross_attention_dim=12, attention_head_dim=2,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def _unet(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(config).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 12, generator=g)


def _trained(lora, seed=2):
    """A LoRA as if trained: B no longer zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=g) * 0.1)
    return lora


@pytest.mark.parametrize("targets", ["attn", "attn+ff", "all"])
def test_b_starts_at_zero_and_weight_zero_and_detach_leave_the_base(targets):
    unet = _unet()
    x, t, ctx = _inputs()
    with torch.no_grad():
        base = unet(x, t, ctx)
        lora = create({"unet": unet}, rank=4, targets=targets)
        assert all(layer.up.weight.abs().sum() == 0 for layer in lora.layers.values())
        handle = attach({"unet": unet}, [(lora, 1.0)])
        assert torch.equal(unet(x, t, ctx), base)  # B = 0: training starts from the base model's output
        handle.detach()
        _trained(lora)
        handle = attach({"unet": unet}, [(lora, 0.0)])
        assert handle.handles == [] and torch.equal(unet(x, t, ctx), base)
        handle = attach({"unet": unet}, [(lora, 0.8)])
        assert not torch.allclose(unet(x, t, ctx), base)
        handle.detach()
        assert torch.equal(unet(x, t, ctx), base)
    names = list(lora.layers)
    if targets == "attn":
        assert all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in names)
    if targets == "all":
        assert any(n.endswith("conv1") for n in names)  # resnet convs get conv LoRAs


def test_merge_equals_the_attached_update_and_loras_add():
    unet = _unet()
    x, t, ctx = _inputs()
    a = _trained(create({"unet": unet}, rank=4, targets="all"), seed=3)
    b = _trained(create({"unet": unet}, rank=2, alpha=1.0, targets="attn", seed=5), seed=4)
    with torch.no_grad():
        handle = attach({"unet": unet}, [(a, 0.7), (b, -0.5)])
        hooked = unet(x, t, ctx)
        handle.detach()
        merge({"unet": unet}, [(a, 0.7), (b, -0.5)])
        assert (unet(x, t, ctx) - hooked).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_file_layouts_round_trip(fmt, tmp_path):
    unet = _unet()
    lora = _trained(create({"unet": unet}, rank=4, alpha=2.0, targets="all"))
    path = save_lora(lora, tmp_path / "l.safetensors", fmt)
    keys = list(__import__("safetensors.torch", fromlist=["load_file"]).load_file(path))
    if fmt == "kohya":
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    else:
        assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    back = load_lora(path, {"unet": unet})
    assert back.layers.keys() == lora.layers.keys()
    for key, layer in lora.layers.items():
        assert torch.equal(back.layers[key].down.weight, layer.down.weight)
        if fmt == "kohya":  # kohya keeps alpha; PEFT files fold alpha / r into B
            assert torch.equal(back.layers[key].up.weight, layer.up.weight) and back.layers[key].alpha == 2.0
        assert torch.allclose(back.layers[key].delta_weight(), layer.delta_weight(), atol=1e-7)
    x, t, ctx = _inputs()
    with torch.no_grad():
        first = attach({"unet": unet}, [(lora, 1.0)])
        expected = unet(x, t, ctx)
        first.detach()
        attach({"unet": unet}, [(back, 1.0)])
        assert (unet(x, t, ctx) - expected).abs().max().item() <= 1e-6


def test_kohya_original_layout_names_for_sdxl_style_files(tmp_path):
    unet = _unet()
    lora = _trained(create({"unet": unet}, rank=2, targets="attn"))
    path = save_lora(lora, tmp_path / "xl.safetensors", "kohya", ldm_names_for=unet)
    keys = list(__import__("safetensors.torch", fromlist=["load_file"]).load_file(path))
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    back = load_lora(path, {"unet": unet})
    assert back.layers.keys() == lora.layers.keys()


def test_a_lora_for_another_model_fails_listing_what_does_not_match(tmp_path):
    other = UNetConfig(**{**CONFIG.__dict__, "block_out_channels": (16, 32, 32)})
    lora = create({"unet": _unet(other)}, rank=2, targets="attn")
    path = save_lora(lora, tmp_path / "other.safetensors")
    unet = _unet()
    loaded = load_lora(path, {"unet": unet})
    with pytest.raises(CheckpointError, match=r"0 of \d+ layers fit this model; \d+ do not fit: .*to_q"):
        attach({"unet": unet}, [(loaded, 1.0)])
    foreign = create({"unet": unet}, rank=2, targets="attn")
    foreign.layers["unet.down_blocks.9.nothing.to_q"] = next(iter(foreign.layers.values()))
    with pytest.raises(CheckpointError, match=r"1 match no module: unet\.down_blocks\.9\.nothing\.to_q"):
        attach({"unet": unet}, [(foreign, 1.0)])
    with pytest.warns(UserWarning, match="match no module"):
        handle = attach({"unet": unet}, [(foreign, 1.0)], strict=False)
    assert len(handle.handles) == len(foreign.layers) - 1
    not_lora = tmp_path / "x.safetensors"
    __import__("safetensors.torch", fromlist=["save_file"]).save_file({"a.weight": torch.zeros(1)}, not_lora)
    with pytest.raises(CheckpointError, match="is not a LoRA: expected kohya's"):
        load_lora(not_lora, {"unet": unet})


def test_text_encoder_lora_changes_the_embedding_and_drops_the_cache(tmp_path):
    pytest.importorskip("diffusers")
    from imagine.adapters.lora import parts_of
    from imagine.pipelines.request import load_text_model
    from tests.tiny_sd import write_pipeline

    write_pipeline("sdxl", tmp_path / "xl")
    model, encoder = load_text_model(tmp_path / "xl")
    parts = parts_of(model, encoder)
    before = encoder.encode(["a red circle"]).context
    lora = _trained(create(parts, rank=2, text_encoder=True))
    assert {"text_encoder", "text_encoder_2"} <= lora.parts()
    handle = attach(parts, [(lora, 1.0)], text_encoder=encoder)
    during = encoder.encode(["a red circle"]).context
    assert not torch.allclose(during, before)
    path = save_lora(lora, tmp_path / "te.safetensors")
    keys = list(__import__("safetensors.torch", fromlist=["load_file"]).load_file(path))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    handle.detach()
    assert torch.equal(encoder.encode(["a red circle"]).context, before)
    back = load_lora(path, parts)
    attach(parts, [(back, 1.0)], text_encoder=encoder)
    assert torch.allclose(encoder.encode(["a red circle"]).context, during, atol=1e-6)
