"""ControlNet and T2I-Adapter against diffusers' ControlNetModel, T2IAdapter and UNet2DConditionModel on tiny
random configs: the same files load both ways and give the same residuals and UNet outputs (<= 1e-4)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import ControlNetModel as DiffusersControlNet
from diffusers import T2IAdapter as DiffusersAdapter
from diffusers import UNet2DConditionModel as DiffusersUNet

from imagine.io.networks import load_controlnet, load_t2i_adapter, load_unet, save_diffusers_model
from imagine.models import ControlNetModel, T2IAdapter, T2IAdapterConfig

TOL = 1e-4

CONFIGS = {
    "sd_like": dict(block_out_channels=(8, 16, 16),
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=12, attention_head_dim=2),
    "sdxl_like": dict(block_out_channels=(8, 16, 16),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      cross_attention_dim=12, attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 1, 2),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
                      projection_class_embeddings_input_dim=6 * 4 + 5),
    # diffusers' from_unet leaves the pooling heads at their default (64), so the text is 64 wide here
    "pooled_text": dict(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                        attention_head_dim=2, addition_embed_type="text"),
}


def _jitter(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter non-trivial, zero convolutions included
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _unet(name: str) -> DiffusersUNet:
    torch.manual_seed(0)
    return _jitter(DiffusersUNet(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=4,
                                 **CONFIGS[name]), 1)


def _inputs(name: str, size: int = 8):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, size, size, generator=g)
    t = torch.tensor([3.0, 781.5])
    context = torch.randn(2, 5, CONFIGS[name]["cross_attention_dim"], generator=g)
    added = {}
    if CONFIGS[name].get("addition_embed_type") == "text_time":
        added = {"text_embeds": torch.randn(2, 5, generator=g),
                 "time_ids": torch.tensor([[64.0, 48, 0, 0, 64, 48], [96, 96, 8, 0, 96, 128]])}
    return x, t, context, added


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_controlnet_loads_and_matches(name, tmp_path):
    reference_unet = _unet(name)
    reference = _jitter(DiffusersControlNet.from_unet(reference_unet, conditioning_embedding_out_channels=(4, 8)), 3)
    reference_unet.save_pretrained(tmp_path / "unet")
    reference.save_pretrained(tmp_path / "controlnet")
    unet, controlnet = load_unet(tmp_path / "unet"), load_controlnet(tmp_path / "controlnet")
    x, t, context, added = _inputs(name)
    cond = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        down_ref, mid_ref = reference(x, t, context, cond, conditioning_scale=0.7, added_cond_kwargs=added or None,
                                      return_dict=False)
        down, mid = controlnet(x, t, context, cond, conditioning_scale=0.7, **added)
        assert len(down) == len(down_ref)
        for a, b in zip(down, down_ref, strict=True):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)
        torch.testing.assert_close(mid, mid_ref, atol=TOL, rtol=0)
        expected = reference_unet(x, t, context, added_cond_kwargs=added or None,
                                  down_block_additional_residuals=down_ref,
                                  mid_block_additional_residual=mid_ref).sample
        got = unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid, **added)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    # guess mode scales the residuals from 0.1 (first skip) to 1 (mid), as diffusers does
    with torch.no_grad():
        g_ref = reference(x, t, context, cond, added_cond_kwargs=added or None, guess_mode=True, return_dict=False)
        g_ours = controlnet(x, t, context, cond, guess_mode=True, **added)
    for a, b in zip([*g_ours[0], g_ours[1]], [*g_ref[0], g_ref[1]], strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_our_controlnet_loads_in_diffusers(tmp_path):
    reference_unet = _unet("sd_like")
    reference_unet.save_pretrained(tmp_path / "unet")
    unet = load_unet(tmp_path / "unet")
    ours = _jitter(ControlNetModel.from_unet(unet, latent_factor=2), 5)
    save_diffusers_model(ours, tmp_path / "cn", "ControlNetModel", {"condition": "canny"})
    theirs = DiffusersControlNet.from_pretrained(tmp_path / "cn").eval()
    x, t, context, _ = _inputs("sd_like")
    cond = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        down, mid = ours(x, t, context, cond)
        down_ref, mid_ref = theirs(x, t, context, cond, return_dict=False)
    for a, b in zip([*down, mid], [*down_ref, mid_ref], strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    # and the file alone carries its config
    again = load_controlnet(tmp_path / "cn" / "diffusion_pytorch_model.safetensors")
    assert again.config == ours.config


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fresh_controlnet_changes_nothing(name, tmp_path):
    _unet(name).save_pretrained(tmp_path)
    unet = load_unet(tmp_path)
    controlnet = ControlNetModel.from_unet(unet, latent_factor=2)
    x, t, context, added = _inputs(name)
    cond = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        base = unet(x, t, context, **added)
        down, mid = controlnet(x, t, context, cond, **added)
        controlled = unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                          **added)
    assert all(not r.any() for r in [*down, mid])
    assert torch.equal(controlled, base)


@pytest.mark.parametrize("name,adapter_type", [("sd_like", "full_adapter"), ("sdxl_like", "full_adapter_xl")])
def test_t2i_adapter_matches_diffusers(name, adapter_type, tmp_path):
    reference_unet = _unet(name)
    reference_unet.save_pretrained(tmp_path / "unet")
    unet = load_unet(tmp_path / "unet")
    cfg = T2IAdapterConfig.for_unet(unet.config, latent_factor=2, num_res_blocks=1)
    assert cfg.adapter_type == adapter_type
    torch.manual_seed(7)
    reference = _jitter(DiffusersAdapter(in_channels=3, channels=list(cfg.channels), num_res_blocks=1,
                                         downscale_factor=cfg.downscale_factor, adapter_type=adapter_type), 8)
    reference.save_pretrained(tmp_path / "adapter")
    adapter = load_t2i_adapter(tmp_path / "adapter")
    x, t, context, added = _inputs(name)
    cond = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        feats_ref = reference(cond)
        feats = adapter(cond)
        for a, b in zip(feats, feats_ref, strict=True):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)
        expected = reference_unet(x, t, context, added_cond_kwargs=added or None,
                                  down_intrablock_additional_residuals=[f * 0.6 for f in feats_ref]).sample
        got = unet(x, t, context, down_intrablock_additional_residuals=[f * 0.6 for f in feats], **added)
        base = unet(x, t, context, **added)
        zero = unet(x, t, context, down_intrablock_additional_residuals=[f * 0.0 for f in feats], **added)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    assert (got - base).abs().max() > 1e-3  # the features matter
    assert torch.equal(zero, base)  # weight 0 is the base model exactly
    # ours written, diffusers reads it
    save_diffusers_model(adapter, tmp_path / "ours", "T2IAdapter", {"condition": "canny"})
    theirs = DiffusersAdapter.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        for a, b in zip(adapter(cond), theirs(cond), strict=True):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_adapter_layout_for_the_shipped_model():
    from imagine.models import UNetConfig

    shipped = UNetConfig(block_out_channels=(48, 96, 96), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                            "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                         norm_num_groups=16, cross_attention_dim=384)
    adapter = T2IAdapter(T2IAdapterConfig.for_unet(shipped, latent_factor=4))
    shapes = [tuple(f.shape[1:]) for f in adapter(torch.rand(1, 3, 64, 64))]
    # after the first block's downsampler, the second block, the third, the mid block
    assert shapes == [(48, 8, 8), (96, 8, 8), (96, 4, 4), (96, 4, 4)]


@pytest.mark.parametrize("prefix", ["", "control_model."])
def test_original_layout_single_file_loads(prefix, tmp_path):
    """A1111's ControlNet files (control_v11p_sd15_*.safetensors) use the original layout: written here from
    a diffusers ControlNet through the key map, read back as the same network."""
    from safetensors.torch import save_file

    from imagine.io.control_files import controlnet_map, load_control
    from imagine.io.ldm_keys import write_mapped

    # the original layout cannot say its norm groups: real files use SD's 32, so this one does too
    torch.manual_seed(0)
    reference_unet = _jitter(DiffusersUNet(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                           cross_attention_dim=12, attention_head_dim=8), 1)
    reference = _jitter(DiffusersControlNet.from_unet(reference_unet, conditioning_embedding_out_channels=(4, 8)), 3)
    reference.save_pretrained(tmp_path / "cn")
    ours = load_controlnet(tmp_path / "cn")
    original = write_mapped(ours.state_dict(), controlnet_map(ours.state_dict(), ours.config, prefix))
    assert {f"{prefix}input_hint_block.0.weight", f"{prefix}input_hint_block.4.weight",
            f"{prefix}zero_convs.0.0.weight", f"{prefix}middle_block_out.0.bias",
            f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            f"{prefix}time_embed.0.weight"} <= set(original)
    file = tmp_path / "control_tiny_canny.safetensors"
    save_file(original, str(file))
    loaded = load_control(file)
    assert loaded.kind == "controlnet" and loaded.condition == "canny"
    x, t, context, _ = _inputs("sd_like")
    cond = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = reference(x, t, context, cond, return_dict=False)
        got = loaded.model(x, t, context, cond)
    for a, b in zip([*got[0], got[1]], [*expected[0], expected[1]], strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    # an extra tensor is refused by name, never ignored
    save_file({**original, "stray.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"stray\.weight"):
        load_control(tmp_path / "extra.safetensors")
    # a LoRA is told apart
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8)},
              str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="LoRA"):
        load_control(tmp_path / "lora.safetensors")
