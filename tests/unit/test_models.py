"""Our checkpoint format: save/load round trips, dtypes, and loud failures."""

from __future__ import annotations

import json

import pytest
import torch

from imagine.io.checkpoint import CheckpointError
from imagine.io.networks import load_unet, load_vae, save_unet, save_vae
from imagine.models import AutoencoderKL, UNet2DConditionModel, UNetConfig, VAEConfig

TINY_UNET = UNetConfig(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       mid_block_type=None, layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
                       num_class_embeds=10, learned_variance=True)
TINY_VAE = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=2, norm_num_groups=4,
                     scaling_factor=0.7)


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(TINY_UNET).eval()


def test_unet_round_trip_and_learned_variance_doubles_output(tmp_path):
    unet = _unet()
    save_unet(unet, tmp_path / "unet")
    again = load_unet(tmp_path / "unet")
    assert again.config == TINY_UNET
    x, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 9])
    with torch.no_grad():
        out = unet(x, torch.tensor([1, 900]), class_labels=labels)
        assert out.shape == (2, 6, 8, 8)
        assert torch.equal(out, again(x, torch.tensor([1, 900]), class_labels=labels))
    # the weights file describes itself: loadable without config.json
    (tmp_path / "unet" / "config.json").unlink()
    assert load_unet(tmp_path / "unet" / "model.safetensors").config == TINY_UNET


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_saving(tmp_path, dtype, torch_dtype):
    from safetensors.torch import load_file

    save_unet(_unet(), tmp_path, dtype=dtype)
    assert all(v.dtype == torch_dtype for v in load_file(tmp_path / "model.safetensors").values())
    loaded = load_unet(tmp_path)  # promoted to the model's float32
    assert next(loaded.parameters()).dtype == torch.float32


def test_vae_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE).eval()
    save_vae(vae, tmp_path)
    again = load_vae(tmp_path)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.decode(vae.encode(x).mean), again.decode(again.encode(x).mean))
    assert again.config.scaling_factor == 0.7
    assert again.encode(x).mean.shape == (1, 2, 4, 4)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    from safetensors.torch import save_file

    save_unet(_unet(), tmp_path)
    state = {k: v for k, v in _unet().state_dict().items() if not k.startswith("conv_out")}
    state["extra.weight"] = torch.zeros(1)
    meta = {"config": (tmp_path / "config.json").read_text()}
    save_file(state, tmp_path / "model.safetensors", metadata=meta)
    with pytest.raises(CheckpointError) as err:
        load_unet(tmp_path)
    assert "missing: conv_out.bias, conv_out.weight" in str(err.value)
    assert "unexpected: extra.weight" in str(err.value)


def test_corrupt_empty_and_foreign_checkpoints_fail_clearly(tmp_path):
    save_unet(_unet(), tmp_path / "ok")
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_unet(tmp_path / "cut")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no UNet weights"):
        load_unet(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no UNet at"):
        load_unet(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="holds a UNet2DConditionModel, not a AutoencoderKL"):
        load_vae(tmp_path / "ok")


def test_pickles_are_loaded_weights_only(tmp_path):
    import pickle

    (tmp_path / "evil").mkdir()

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    (tmp_path / "evil" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="weights_only"):
        load_unet(tmp_path / "evil")


def test_unsupported_diffusers_settings_are_named(tmp_path):
    save_unet(_unet(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "learned_variance"}
    cfg.update(_class_name="UNet2DConditionModel", resnet_time_scale_shift="scale_shift", timestep_post_act="silu")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file(_unet().state_dict(), tmp_path / "model.safetensors")  # no metadata: config.json decides
    with pytest.raises(CheckpointError, match="resnet_time_scale_shift='scale_shift', timestep_post_act='silu'"):
        load_unet(tmp_path)


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="not divisible by norm_num_groups"):
        UNetConfig(block_out_channels=(10, 16), norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                   up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(ValueError, match="need 2 down and 2 up block types"):
        UNetConfig(block_out_channels=(8, 16), norm_num_groups=4)
    with pytest.raises(ValueError, match="unknown UNet config keys"):
        UNetConfig.from_dict({"block_out_chanels": [8]})
    unet = _unet()
    with pytest.raises(ValueError, match="class-conditional: pass class_labels"):
        unet(torch.randn(1, 3, 8, 8), 5)
    with pytest.raises(ValueError, match=r"expected a \(B, 3, H, W\) sample"):
        unet(torch.randn(1, 4, 8, 8), 5, class_labels=torch.tensor([1]))
    vae = AutoencoderKL(TINY_VAE)
    with pytest.raises(ValueError, match="not a multiple of the VAE's factor 2"):
        vae.encode(torch.randn(1, 3, 7, 8))


def _efficient(**options):
    from imagine.models import UNet2DConditionModel, UNetConfig

    cfg = UNetConfig(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16),
                     down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=6,
                     attention_head_dim=2, norm_num_groups=4, **options)
    torch.manual_seed(0)
    return UNet2DConditionModel(cfg)


def test_efficient_unet_per_level_layers_and_downsample_first_shapes():
    """Imagen's Efficient U-Net: more resnets where the resolution is low, and each down block after the
    first opens with its downsampler (so its resnets run at the lower resolution)."""
    net = _efficient(layers_per_block=(1, 2, 4), downsample_first=True)
    assert [len(b.resnets) for b in net.down_blocks] == [1, 2, 4]
    assert [len(b.resnets) for b in net.up_blocks] == [5, 3, 2]
    assert net.down_blocks[0].downsamplers is None
    assert [b.downsamplers[0].conv.in_channels for b in net.down_blocks[1:]] == [8, 16]  # the incoming width
    sizes = []
    hooks = [b.resnets[0].register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
             for b in net.down_blocks]
    x, ctx = torch.randn(2, 3, 16, 12), torch.randn(2, 5, 6)
    out = net(x, torch.tensor([10.0, 500.0]), ctx)
    for h in hooks:
        h.remove()
    assert sizes == [(16, 12), (8, 6), (4, 3)]  # each block's resnets already at its own resolution
    assert out.shape == x.shape
    plain = _efficient(layers_per_block=(1, 2, 4))
    assert [b.downsamplers is not None for b in plain.down_blocks] == [True, True, False]  # diffusers' order


def test_efficient_unet_scales_every_skip_by_the_factor():
    """skip_scale multiplies each skip where the up path concatenates it, and nothing else: a net with
    skip_scale s equals the plain net with every skip scaled by s by hand."""
    import math

    scaled = _efficient(skip_scale=1 / math.sqrt(2))
    plain = _efficient()
    plain.load_state_dict(scaled.state_dict())
    seen = []

    def scale_skips(module, args):
        x, skips = args[0], args[1]
        seen.append(len(skips))
        return (x, [s / math.sqrt(2) for s in skips], *args[2:])

    hooks = [b.register_forward_pre_hook(scale_skips) for b in plain.up_blocks]
    x, ctx, t = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 6), torch.tensor([3.0, 900.0])
    with torch.no_grad():
        expected = plain(x, t, ctx)
        got = scaled(x, t, ctx)
        for h in hooks:
            h.remove()
        unscaled = plain(x, t, ctx)
    assert sum(seen) == sum(len(b.resnets) for b in plain.up_blocks)  # every skip passed through the hook
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - unscaled).abs().max() > 1e-3


def test_efficient_unet_options_are_checked_and_kept_out_of_diffusers_layouts():
    from imagine.io.networks import diffusers_config
    from imagine.models import ControlNetModel, UNetConfig

    with pytest.raises(ValueError, match="layers_per_block has 2 entries for 3 blocks"):
        _efficient(layers_per_block=(1, 2))
    with pytest.raises(ValueError, match="layers_per_block must be >= 1"):
        _efficient(layers_per_block=(1, 0, 2))
    with pytest.raises(ValueError, match="skip_scale must be positive"):
        _efficient(skip_scale=0.0)
    net = _efficient(downsample_first=True)
    with pytest.raises(ValueError, match="no diffusers layout"):
        diffusers_config(net)
    with pytest.raises(ValueError, match="Efficient U-Net"):
        ControlNetModel.from_unet(net, 1)
    config = diffusers_config(_efficient(layers_per_block=(1, 1, 2)))
    assert "skip_scale" not in config and "downsample_first" not in config and config["layers_per_block"] == [1, 1, 2]
    assert UNetConfig.from_dict(dict(UNetConfig().__dict__)).skip_scale == 1.0


def test_pooled_text_conditioning_acts_and_keeps_rows_batch_invariant():
    """addition_embed_type "text": the pooled text states change the output beyond cross-attention's reach
    (a UNet without cross-attention layers still hears the prompt), a text width the heads do not divide is
    refused, and under generation (no gradient, CPU) the shapes-wide network (the next default) computes a row
    the same in any batch of two or more, at any position (a lone row runs beside a copy of itself,
    pipelines/generate._TwoRowFloor)."""
    from imagine.models import UNet2DConditionModel, UNetConfig
    from imagine.train.config import PRESETS
    from imagine.train.loop import make_unet_config

    cfg = UNetConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                     down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                     mid_block_type=None, norm_num_groups=4, cross_attention_dim=12, addition_embed_type="text",
                     addition_embed_type_num_heads=3)
    torch.manual_seed(0)
    net = UNet2DConditionModel(cfg).eval()
    x, t, text = torch.randn(3, 4, 8, 8), torch.tensor([3, 500, 999]), torch.randn(3, 7, 12)
    with torch.no_grad():
        assert (net(x, t, text.roll(1, 0)) - net(x, t, text)).abs().max() > 1e-4  # another prompt, another picture
        with pytest.raises(ValueError, match="pass encoder_hidden_states"):
            net(x, t)
    with pytest.raises(ValueError, match="heads, which do not divide them"):
        UNetConfig(cross_attention_dim=10, addition_embed_type="text", addition_embed_type_num_heads=3)
    wide = UNet2DConditionModel(make_unet_config(PRESETS["shapes-wide"], 4, 0, 384)).eval()
    assert wide.config.addition_embed_type == "text"
    x, t = torch.randn(3, 4, 16, 16), torch.tensor([3.0, 500.0, 999.0])
    text, mask = torch.randn(3, 77, 384), torch.arange(77)[None] < torch.tensor([[9], [20], [77]])
    text = text * mask[..., None]  # MiniLM's windows: zeros past the prompt
    with torch.no_grad():
        out = wide(x, t, text, encoder_attention_mask=mask)
        for i, j in ((0, 1), (1, 2), (2, 0)):
            pair = [j, i]  # row i second, beside another
            got = wide(x[pair], t[pair], text[pair], encoder_attention_mask=mask[pair])
            assert torch.equal(got[1], out[i]) and torch.equal(got[0], out[j])


def test_saved_weights_are_ordinary_files(tmp_path):
    """Weights are written under a temporary name (mkstemp: mode 0600) and renamed into place; the file must
    end up readable as any file the user makes (the umask's mode), or a shipped model is unreadable to others."""
    import os

    from imagine.io.checkpoint import atomic_save_safetensors, atomic_write_bytes

    umask = os.umask(0)
    os.umask(umask)
    atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors", {})
    atomic_write_bytes(tmp_path / "c.json", b"{}")
    for name in ("w.safetensors", "c.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
