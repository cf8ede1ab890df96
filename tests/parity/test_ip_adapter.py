"""IP-Adapter against diffusers: a file imagine writes loads through diffusers' ``load_ip_adapter`` (with a
tiny CLIP vision encoder saved beside it, offline) and the UNet outputs agree within 1e-4; with scale 0 the
output is bit-identical to the base UNet's."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DiffusionPipeline
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.loaders import IPAdapterMixin

from imagine.io.ip_adapter_files import load_ip_adapter, save_ip_adapter
from imagine.io.networks import load_unet
from imagine.models.ip_adapter import IPAdapter, cross_attention_layers

from .test_control import CONFIGS, _inputs, _jitter

TOL = 1e-4
EMBED = 10


class _Pipe(DiffusionPipeline, IPAdapterMixin):
    """The least pipeline diffusers' IPAdapterMixin.load_ip_adapter works on: a UNet and an image encoder."""

    _optional_components = ["image_encoder", "feature_extractor"]  # noqa: RUF012 - diffusers' own convention

    def __init__(self, unet, image_encoder=None, feature_extractor=None):
        super().__init__()
        self.register_modules(unet=unet, image_encoder=image_encoder, feature_extractor=feature_extractor)


def _image_encoder(folder):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(5)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=EMBED)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)


def _unet(name):
    torch.manual_seed(0)
    return _jitter(DiffusersUNet(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=4,
                                 **CONFIGS[name]), 1)


# diffusers' pooled-text embedding (addition_embed_type "text") reads encoder_hidden_states, which its IP-Adapter
# path turns into a (text, image) tuple, so diffusers cannot run that pair: no oracle for it
@pytest.mark.parametrize("name", [n for n in CONFIGS if CONFIGS[n].get("addition_embed_type") != "text"])
def test_imagine_ip_adapter_loads_in_diffusers_and_matches(name, tmp_path):
    reference_unet = _unet(name)
    reference_unet.save_pretrained(tmp_path / "unet")
    unet = load_unet(tmp_path / "unet")
    adapter = _jitter(IPAdapter.from_unet(unet, EMBED, seed=3), 4)
    folder = tmp_path / "ip"
    folder.mkdir()
    save_ip_adapter(adapter, folder / "ip-adapter.safetensors", "image_encoder")
    _image_encoder(folder / "image_encoder")

    pipe = _Pipe(reference_unet)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter.safetensors",
                         image_encoder_folder="image_encoder")
    assert pipe.image_encoder is not None  # diffusers found the encoder beside the file
    pipe.set_ip_adapter_scale(0.6)

    ours = load_ip_adapter(folder)  # the folder: the one weights file, the encoder beside it
    assert ours.encoder.endswith("image_encoder")
    x, t, context, added = _inputs(name)
    embeds = torch.randn(2, EMBED, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = pipe.unet(x, t, context, added_cond_kwargs={**added, "image_embeds": [embeds[:, None]]}).sample
        streams = ours.model.streams(unet, ours.model.tokens(embeds), 0.6)
        got = unet(x, t, context, attention_streams=streams, **added)
    assert (got - expected).abs().max() < TOL
    assert (got - unet(x, t, context, **added)).abs().max() > 1e-3  # the image tokens do matter


def test_scale_zero_is_the_base_model_bit_for_bit(tmp_path):
    reference_unet = _unet("sd_like")
    reference_unet.save_pretrained(tmp_path / "unet")
    unet = load_unet(tmp_path / "unet")
    adapter = _jitter(IPAdapter.from_unet(unet, EMBED), 2)
    x, t, context, _ = _inputs("sd_like")
    tokens = adapter.tokens(torch.randn(2, EMBED))
    with torch.no_grad():
        base = unet(x, t, context)
        zero = unet(x, t, context, attention_streams=adapter.streams(unet, tokens, 0.0))
    assert torch.equal(base, zero)


def test_layers_follow_diffusers_processor_order():
    unet = _unet("sdxl_like")
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    # diffusers: down blocks, up blocks, then the mid block
    assert names[-1].startswith("mid_block") and names[0].startswith("down_blocks")
    from imagine.models import UNet2DConditionModel
    from imagine.models.unet import UNetConfig

    cfg = UNetConfig(sample_size=8, layers_per_block=1, norm_num_groups=4, **CONFIGS["sdxl_like"])
    ours = UNet2DConditionModel(cfg)
    widths = [layer.to_k.out_features for layer in cross_attention_layers(ours)]
    theirs = [unet.get_submodule(n.removesuffix(".processor")).to_k.out_features for n in names]
    assert widths == theirs and len(widths) == len(names)
