"""Our UNet and VAE, loaded from folders that diffusers wrote from tiny random configs, give diffusers'
outputs on the same inputs (max abs difference <= 1e-4, float32)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel as DiffusersUNet

from imagine.io.networks import load_unet, load_vae

TOL = 1e-4

UNET_CONFIGS = {
    "sd_like_cross_attention": dict(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=2),
    "three_levels_multi_layer_transformers": dict(
        block_out_channels=(8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=6,
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2), layers_per_block=2),
    "sd2_linear_projection": dict(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=10,
        attention_head_dim=(1, 2), use_linear_projection=True),
    "no_cross_attention_class_conditional": dict(
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None, num_class_embeds=10),
    "self_attention_class_conditional": dict(
        block_out_channels=(8, 16, 24), down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), mid_block_type=None, num_class_embeds=4,
        attention_head_dim=4),
    "cross_attention_and_class_labels_with_heads": dict(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=(4, 2),
        num_class_embeds=3, flip_sin_to_cos=False, freq_shift=1),
    "sdxl_text_time_micro_conditioning": dict(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=12,
        attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 5),
    "per_level_layers_with_class_labels": dict(  # Efficient U-Net's more resnets at low resolution; SD x4 upscaler's
        block_out_channels=(8, 16, 16), down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=12,
        attention_head_dim=2, layers_per_block=(1, 2, 3), num_class_embeds=5),
    "pooled_text_states": dict(  # diffusers' addition_embed_type "text": attention-pooled text joins the time
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=2,
        addition_embed_type="text", addition_embed_type_num_heads=3),
    "lcm_guidance_embedding": dict(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=2,
        time_cond_proj_dim=16),
}


def _diffusers_unet(settings: dict, seed: int = 0) -> DiffusersUNet:
    torch.manual_seed(seed)
    base = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=4)
    model = DiffusersUNet(**{**base, **settings})
    with torch.no_grad():  # random non-trivial norms and biases too, so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
@pytest.mark.parametrize("size", [8, 12])
def test_unet_matches_diffusers(name, size, tmp_path):
    settings = UNET_CONFIGS[name]
    reference = _diffusers_unet(settings)
    reference.save_pretrained(tmp_path)
    ours = load_unet(tmp_path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g)
    t = torch.tensor([3.0, 781.5])
    kwargs = {"encoder_hidden_states": None}
    if "cross_attention_dim" in settings:
        kwargs["encoder_hidden_states"] = torch.randn(2, 7, settings["cross_attention_dim"], generator=g)
    if "num_class_embeds" in settings:
        kwargs["class_labels"] = torch.tensor([1, settings["num_class_embeds"] - 1])
    added = {}
    if settings.get("time_cond_proj_dim"):  # an LCM's guidance scale, embedded as diffusers' pipeline does
        from diffusers import LatentConsistencyModelPipeline

        w = torch.tensor([2.0, 7.5])
        kwargs["timestep_cond"] = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, 16)
        from imagine.nn.embeddings import guidance_embedding

        torch.testing.assert_close(guidance_embedding(w, 16), kwargs["timestep_cond"])
    if settings.get("addition_embed_type") == "text_time":  # pooled text (5-d here) and six size numbers
        added = {"text_embeds": torch.randn(2, 5, generator=g),
                 "time_ids": torch.tensor([[64.0, 48, 0, 0, 64, 48], [1024, 1024, 16, 8, 96, 128]])}
    with torch.no_grad():
        expected = reference(x, t, **kwargs, added_cond_kwargs=added or None).sample
        got = ours(x, t, **kwargs, **added)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


def test_unet_text_mask_matches_diffusers(tmp_path):
    reference = _diffusers_unet(UNET_CONFIGS["sd_like_cross_attention"])
    reference.save_pretrained(tmp_path)
    ours = load_unet(tmp_path)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = reference(x, 10, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        got = ours(x, 10, encoder_hidden_states=ctx, encoder_attention_mask=mask)
    assert (got - expected).abs().max().item() <= TOL
    with torch.no_grad():  # and the mask matters
        assert (ours(x, 10, encoder_hidden_states=ctx) - got).abs().max() > 1e-3


VAE_CONFIGS = {
    "two_levels": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4),
    "three_levels_two_layers": dict(block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=3,
                                    scaling_factor=0.5),
    "no_mid_attention": dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                             mid_block_add_attention=False),
}


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_matches_diffusers(name, tmp_path):
    settings = VAE_CONFIGS[name]
    n = len(settings["block_out_channels"])
    torch.manual_seed(0)
    reference = DiffusersVAE(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                             up_block_types=("UpDecoderBlock2D",) * n, norm_num_groups=4, **settings).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.save_pretrained(tmp_path)
    ours = load_vae(tmp_path)
    assert ours.config.scaling_factor == settings.get("scaling_factor", 0.18215)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        dist_ref, dist = reference.encode(image).latent_dist, ours.encode(image)
        assert (dist.mean - dist_ref.mean).abs().max().item() <= TOL
        assert (dist.std - dist_ref.std).abs().max().item() <= TOL
        z = dist_ref.mean
        assert (ours.decode(z) - reference.decode(z).sample).abs().max().item() <= TOL
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert torch.allclose(dist.sample(generator=g1), dist_ref.sample(generator=g2), atol=TOL)


def test_one_config_builds_sd15_with_diffusers_keys_and_size():
    """SD 1.5's UNet (860M parameters) from our default config, on the meta device (no memory):
    the same parameter names and shapes as diffusers' for the same configuration."""
    from imagine.models import UNet2DConditionModel, UNetConfig

    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig(sample_size=64))
        theirs = DiffusersUNet(sample_size=64, cross_attention_dim=768)  # SD 1.5's unet/config.json
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
