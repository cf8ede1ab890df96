"""The diffusion transformers against diffusers' modules: the same weights (our state dict loaded into
theirs, strict), the same inputs, the same outputs within 1e-5."""

from __future__ import annotations

import pytest
import torch

from imagine.models.dit import DiTConfig, DiTTransformer2DModel

diffusers = pytest.importorskip("diffusers")


def _jitter(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: adaLN-Zero's zero init would hide most of the network from the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("size, learned_sigma", [(8, False), (8, True), (12, False)])
def test_dit_matches_diffusers(size, learned_sigma):
    cfg = DiTConfig(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                    out_channels=8 if learned_sigma else None, num_layers=2, sample_size=8, patch_size=2,
                    num_embeds_ada_norm=10)
    ours = _jitter(DiTTransformer2DModel(cfg), 0)
    theirs = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                             out_channels=8 if learned_sigma else None, num_layers=2,
                                             sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, size, size, generator=g)
    t = torch.tensor([0.0, 411.5, 999.0])
    labels = torch.tensor([0, 7, 10])  # 10: the dropped label
    with torch.no_grad():
        want = theirs(x, timestep=t, class_labels=labels).sample
        got = ours(x, t, class_labels=labels)
    assert got.shape == want.shape == (3, 8 if learned_sigma else 4, size, size)
    assert (got - want).abs().max() < 1e-5


def test_dit_starts_as_adaln_zero_says():
    """Freshly made: every gate and the output projection are zero, so the output is exactly zero."""
    net = DiTTransformer2DModel(DiTConfig(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8,
                                          num_embeds_ada_norm=3))
    out = net(torch.randn(2, 4, 8, 8), torch.tensor([5.0, 500.0]), class_labels=torch.tensor([0, 3]))
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match="class-conditional"):
        net(torch.randn(1, 4, 8, 8), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        net(torch.randn(1, 4, 7, 8), torch.tensor([1.0]), class_labels=torch.tensor([0]))


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("height, width", [(8, 8), (8, 12)])
def test_mmdit_matches_diffusers(qk_norm, height, width):
    from imagine.models.mmdit import MMDiTConfig, SD3Transformer2DModel

    kwargs = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,
                  out_channels=4, pos_embed_max_size=16, qk_norm=qk_norm)
    ours = _jitter(SD3Transformer2DModel(MMDiTConfig(**kwargs)), 2)
    theirs = diffusers.SD3Transformer2DModel(**kwargs).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, height, width, generator=g)
    context, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 6, generator=g)
    t = torch.tensor([999.0, 250.5])
    with torch.no_grad():
        want = theirs(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
        got = ours(x, t, encoder_hidden_states=context, pooled_projections=pooled)
    assert got.shape == want.shape == x.shape
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("control_layers", [1, 3])
def test_sd3_controlnet_and_its_use_match_diffusers(control_layers):
    """diffusers' SD3ControlNetModel on the same weights and inputs, and the MMDiT adding its outputs after the
    blocks they align with (1 output for 3 blocks: every block takes it; 3 outputs: one each)."""
    from imagine.models.mmdit import MMDiTConfig, MMDiTControlNetConfig, SD3ControlNetModel, SD3Transformer2DModel

    kwargs = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,
                  out_channels=4, pos_embed_max_size=16)
    base = _jitter(SD3Transformer2DModel(MMDiTConfig(**kwargs)), 2)
    theirs_base = diffusers.SD3Transformer2DModel(**kwargs).eval()
    theirs_base.load_state_dict(base.state_dict(), strict=True)
    ours = _jitter(SD3ControlNetModel(MMDiTControlNetConfig(**{**kwargs, "num_layers": control_layers})), 4)
    theirs = diffusers.SD3ControlNetModel(**{**kwargs, "num_layers": control_layers}).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(3)
    x, cond = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 4, 8, 12, generator=g)
    context, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 6, generator=g)
    t = torch.tensor([999.0, 250.5])
    with torch.no_grad():
        want = theirs(x, controlnet_cond=cond, conditioning_scale=0.7, encoder_hidden_states=context,
                      pooled_projections=pooled, timestep=t).controlnet_block_samples
        got = ours(x, t, context, pooled, cond, conditioning_scale=0.7)
        assert len(got) == len(want) == control_layers
        assert max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True)) < 1e-5
        want_out = theirs_base(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                               block_controlnet_hidden_states=want).sample
        got_out = base(x, t, encoder_hidden_states=context, pooled_projections=pooled,
                       block_controlnet_hidden_states=got)
    assert (got_out - want_out).abs().max() < 1e-5
    # a fresh one, copied from the base, changes nothing
    fresh = SD3ControlNetModel.from_transformer(base, 2)
    with torch.no_grad():
        plain = base(x, t, encoder_hidden_states=context, pooled_projections=pooled)
        controlled = base(x, t, encoder_hidden_states=context, pooled_projections=pooled,
                          block_controlnet_hidden_states=fresh(x, t, context, pooled, cond))
    assert torch.equal(plain, controlled)


def test_sd35_medium_dual_attention_matches_diffusers():
    """SD3.5 Medium's MMDiT-X: blocks 0 and 1 (of 3) add an image-only self-attention with its own modulation."""
    from imagine.models.mmdit import MMDiTConfig, SD3Transformer2DModel

    kwargs = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,
                  out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0, 1))
    ours = _jitter(SD3Transformer2DModel(MMDiTConfig(**kwargs)), 5)
    theirs = diffusers.SD3Transformer2DModel(**kwargs).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(3)
    x, context, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g), torch.randn(
        2, 6, generator=g)
    t = torch.tensor([999.0, 250.5])
    with torch.no_grad():
        want = theirs(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
        got = ours(x, t, encoder_hidden_states=context, pooled_projections=pooled)
    assert (got - want).abs().max() < 1e-5


def test_mmdit_refuses_what_it_does_not_build():
    from imagine.models.mmdit import MMDiTConfig

    with pytest.raises(ValueError, match="dual_attention_layers"):
        MMDiTConfig(num_layers=2, dual_attention_layers=(0, 5))
    with pytest.raises(ValueError, match="caption_projection_dim"):
        MMDiTConfig(num_attention_heads=2, attention_head_dim=8, caption_projection_dim=12)


@pytest.mark.parametrize("sample_size, height, width", [(8, 8, 8), (8, 8, 12), (128, 8, 8)])
def test_pixart_matches_diffusers(sample_size, height, width):
    """sample_size 128 switches on PixArt-alpha 1024's resolution and aspect-ratio embeddings (and positions
    scaled by 2); a text mask leaves two tokens out of one row."""
    from imagine.models.pixart import PixArtConfig, PixArtTransformer2DModel

    head = 12 if sample_size == 128 else 8  # the size embeddings take a third of the width each
    kwargs = dict(num_attention_heads=2, attention_head_dim=head, in_channels=4, out_channels=8, num_layers=2,
                  cross_attention_dim=2 * head, sample_size=sample_size, patch_size=2, caption_channels=12)
    ours = _jitter(PixArtTransformer2DModel(PixArtConfig(**kwargs)), 4)
    theirs = diffusers.PixArtTransformer2DModel(**kwargs).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, height, width, generator=g)
    context = torch.randn(2, 6, 12, generator=g)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    t = torch.tensor([999.0, 12.0])
    extra = {}
    if sample_size == 128:
        extra = {"resolution": torch.tensor([[64.0, 64.0], [64.0, 96.0]]), "aspect_ratio": torch.tensor([[1.0], [1.5]])}
    with torch.no_grad():
        want = theirs(x, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=t,
                      added_cond_kwargs=extra).sample
        got = ours(x, t, encoder_hidden_states=context, encoder_attention_mask=mask, **extra)
    assert got.shape == want.shape == (2, 8, height, width)
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("guidance", [False, True])
def test_flux_matches_diffusers(guidance):
    from imagine.models.flux import FluxConfig, FluxTransformer2DModel, latent_ids, pack_latents, unpack_latents

    kwargs = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6, guidance_embeds=guidance,
                  axes_dims_rope=(2, 2, 4))
    ours = _jitter(FluxTransformer2DModel(FluxConfig(**kwargs)), 6)
    theirs = diffusers.FluxTransformer2DModel(**kwargs).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 4, 8, 12, generator=g)
    tokens = pack_latents(latents)  # (2, 24, 16)
    img_ids = latent_ids(8, 12)
    txt_ids = torch.zeros(5, 3)
    context, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 6, generator=g)
    t = torch.tensor([1.0, 0.3])
    w = torch.tensor([3.5, 3.5]) if guidance else None
    with torch.no_grad():
        want = theirs(tokens, encoder_hidden_states=context, pooled_projections=pooled, timestep=t, img_ids=img_ids,
                      txt_ids=txt_ids, guidance=w).sample
        got = ours(tokens, t, encoder_hidden_states=context, pooled_projections=pooled, img_ids=img_ids,
                   txt_ids=txt_ids, guidance=w)
        # called as imagine's denoisers are (latents in and out, the timestep on the 0-1000 scale), with a mask
        # that keeps every text token: the same numbers, unpacked
        as_denoiser = ours(latents, t * 1000, encoder_hidden_states=context, pooled_projections=pooled, guidance=w,
                           encoder_attention_mask=torch.ones(2, 5, dtype=torch.bool))
        # a masked text token no longer counts: the output equals the one without that token
        masked = ours(latents, t * 1000, encoder_hidden_states=context, pooled_projections=pooled, guidance=w,
                      encoder_attention_mask=torch.tensor([[True] * 4 + [False]] * 2))
        dropped = ours(latents, t * 1000, encoder_hidden_states=context[:, :4], pooled_projections=pooled, guidance=w)
    assert got.shape == want.shape == tokens.shape
    assert (got - want).abs().max() < 1e-5
    assert (as_denoiser - unpack_latents(want, 8, 12)).abs().max() < 1e-5
    assert (masked - dropped).abs().max() < 1e-5 and (masked - as_denoiser).abs().max() > 1e-4


def test_flux_packing_matches_diffusers_pipeline():
    from imagine.models.flux import latent_ids, pack_latents, unpack_latents

    pipe = diffusers.FluxPipeline
    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    assert torch.equal(packed, pipe._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    assert torch.equal(latent_ids(6, 10), pipe._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
