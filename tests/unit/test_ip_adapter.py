"""IP-Adapter pieces: Composer's palette and intensity, file refusals, encoder-width and base-model checks,
the reference re-renders, the CLI's --image-prompt parser and the CLIP vision encoder's folder."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from imagine.adapters.image_prompt import ImagePromptUnit, Prompted, encode_reference
from imagine.io.checkpoint import CheckpointError
from imagine.io.ip_adapter_files import IPAdapterFile, load_ip_adapter, save_ip_adapter
from imagine.io.networks import load_image_encoder
from imagine.models import UNet2DConditionModel
from imagine.models.image_encoders import intensity, palette, palette_distance
from imagine.models.ip_adapter import IPAdapter, check_fits
from imagine.models.unet import UNetConfig

TINY = dict(sample_size=8, block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=4,
            cross_attention_dim=12, attention_head_dim=2)


def _solid(rgb, size=16):
    x = torch.tensor(rgb, dtype=torch.float32).reshape(1, 3, 1, 1) / 127.5 - 1
    return x.expand(1, 3, size, size)


def test_palette_is_a_smoothed_histogram_that_tells_colours_apart():
    red, red2, blue = palette(_solid((220, 40, 40))), palette(_solid((200, 50, 45))), palette(_solid((50, 90, 235)))
    assert red.shape == (1, 275) and torch.allclose(red.sum(-1), torch.ones(1))
    assert palette_distance(red, red) < 1e-6
    assert palette_distance(red, red2) < 0.5 < palette_distance(red, blue)
    half = torch.cat([_solid((220, 40, 40))[..., :8], _solid((50, 90, 235))[..., 8:]], dim=-1)
    mixed = palette(half)  # half red, half blue: between the two, sharing mass with each
    assert palette_distance(mixed, red) < palette_distance(blue, red)
    assert palette_distance(mixed, blue) < palette_distance(red, blue)


def test_intensity_is_the_luminance_layout():
    img = torch.full((1, 3, 16, 16), -1.0)
    img[..., :8, :] = 1.0  # bright top half
    v = intensity(img)
    assert v.shape == (1, 66)
    grid = v[0, :64].reshape(8, 8)
    assert torch.allclose(grid[:4], torch.ones(4, 8)) and torch.allclose(grid[4:], -torch.ones(4, 8))
    assert abs(float(v[0, 64])) < 1e-6 and float(v[0, 65]) > 0.9


def _unet(**over):
    torch.manual_seed(0)
    return UNet2DConditionModel(UNetConfig(**{**TINY, **over})).eval()


def test_wrong_encoder_width_and_other_base_model_are_refused(tmp_path):
    unet = _unet()
    adapter = IPAdapter.from_unet(unet, 10)
    file = IPAdapterFile(adapter, "palette", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="reads 10-wide image embeddings, but its image encoder palette gives 275"):
        encode_reference(file, Image.new("RGB", (16, 16)))
    with pytest.raises(ValueError, match="made for another base model"):
        check_fits(adapter, _unet(block_out_channels=(8, 24)), "x")


def test_foreign_and_variant_files_are_refused_by_name(tmp_path):
    plus = {"image_proj.latents": torch.zeros(1, 16, 12), "image_proj.proj_in.weight": torch.zeros(12, 10),
            "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 12), "ip_adapter.1.to_v_ip.weight": torch.zeros(8, 12)}
    save_file(plus, str(tmp_path / "plus.safetensors"))
    with pytest.raises(CheckpointError, match="IP-Adapter Plus"):
        load_ip_adapter(tmp_path / "plus.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="not an IP-Adapter"):
        load_ip_adapter(tmp_path / "lora.safetensors")
    (tmp_path / "bin").mkdir()
    torch.save({"image_proj": {}, "ip_adapter": {}}, tmp_path / "bin" / "ip-adapter.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_ip_adapter(tmp_path / "bin")


def test_original_bin_layout_loads_with_weights_only(tmp_path):
    unet = _unet()
    adapter = IPAdapter.from_unet(unet, 10)
    state = adapter.state_dict()
    nested = {"image_proj": {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[len("ip_adapter."):]: v for k, v in state.items() if k.startswith("ip_adapter.")}}
    torch.save(nested, tmp_path / "ip-adapter.bin")
    loaded = load_ip_adapter(tmp_path / "ip-adapter.bin", allow_pickle=True, image_encoder="palette")
    assert loaded.model.config == adapter.config and loaded.encoder == "palette"
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())


def test_saved_file_round_trips_with_its_encoder(tmp_path):
    unet = _unet()
    adapter = IPAdapter.from_unet(unet, 66)
    path = save_ip_adapter(adapter, tmp_path / "a.safetensors", "intensity", {"base_model": "tiny"})
    loaded = load_ip_adapter(path)
    assert loaded.encoder == "intensity" and loaded.info["base_model"] == "tiny"
    # a scale-0 prompt leaves the UNet's output bit-identical
    from imagine.adapters.image_prompt import TOKENS, ImagePrompted, prompt_tokens

    prompt = Prompted(loaded, encode_reference(loaded, Image.new("RGB", (16, 16), (200, 10, 10))), 0.0)
    cond, _ = prompt_tokens([prompt], 2)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 3, 12)
    with torch.no_grad():
        wrapped = ImagePrompted(unet, unet, [prompt])(x, t, encoder_hidden_states=ctx, **{TOKENS: cond})
        assert torch.equal(wrapped, unet(x, t, ctx))
        prompt.scale = 1.0
        assert not torch.equal(ImagePrompted(unet, unet, [prompt])(x, t, encoder_hidden_states=ctx, **{TOKENS: cond}),
                               unet(x, t, ctx))


def test_references_are_rerenders_of_the_scene_and_deterministic():
    from imagine.data.shapes import ShapesDataset
    from imagine.train.ip_adapter import IPAdapterTrainConfig, references

    data = ShapesDataset(size=32)
    images, _, _ = data.batch([0, 1, 2, 3])
    cfg = IPAdapterTrainConfig(rerender=1.0)
    a = references(data, images, [0, 1, 2, 3], cfg, torch.tensor([5, 6, 7, 8]))
    b = references(data, images, [0, 1, 2, 3], cfg, torch.tensor([5, 6, 7, 8]))
    assert torch.equal(a, b) and a.shape == images.shape
    assert not torch.equal(a, images)  # placed anew
    # the same colours: each reference's palette is close to its scene's
    assert float(palette_distance(palette(a), palette(images)).max()) < 0.2
    same = references(data, images, [0, 1, 2, 3], IPAdapterTrainConfig(rerender=0.0), torch.tensor([5, 6, 7, 8]))
    assert torch.equal(same, images)


def test_cli_image_prompt_parser(tmp_path):
    from imagine.cli.generate import image_prompt_units

    Image.new("RGB", (8, 8)).save(tmp_path / "r.png")
    ref = str(tmp_path / "r.png")
    plain, typed, named = image_prompt_units([ref, f"palette:{ref}:0.5", f"content@my-ip:{ref}:0.7:0.1:0.9"])
    assert (plain.type, plain.scale, plain.model) == ("content", 1.0, None)
    assert (typed.type, typed.scale) == ("palette", 0.5)
    assert (named.model, named.scale, named.start, named.end) == ("my-ip", 0.7, 0.1, 0.9)
    with pytest.raises(ValueError, match="START and END together"):
        image_prompt_units([f"{ref}:1:0.5"])
    with pytest.raises(ValueError, match="type 'shape' unknown"):
        ImagePromptUnit(Image.new("RGB", (8, 8)), type="shape").check()


def test_clip_vision_encoder_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=10)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "enc")
    encoder = load_image_encoder(tmp_path / "enc")
    assert encoder.dim == 10
    images = torch.rand(2, 3, 48, 64) * 2 - 1
    x = encoder.preprocess(images)
    assert x.shape == (2, 3, 32, 32)
    assert torch.allclose(encoder.embed(images), encoder.model(pixel_values=x).image_embeds, atol=1e-6)
    with pytest.raises(ValueError, match="not an image encoder"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "config.json").write_text('{"architectures": ["BertModel"]}')
        load_image_encoder(tmp_path / "other")
