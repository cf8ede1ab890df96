"""Single-file Stable Diffusion checkpoints: the key maps against the real SD 1.5, SD 2.1 and SDXL key
sets and shapes (hand-checked entries from the released files; full-size models built on the meta
device, so no memory), architecture detection from shapes alone, and loud refusals of bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from imagine.io.checkpoint import CheckpointError, Ref, open_weights
from imagine.io.ldm_keys import clip_map, open_clip_map, unet_map, vae_map, write_mapped
from imagine.io.stable_diffusion import (
    TE_SD1,
    TE_SD2,
    TE_XL1,
    TE_XL2,
    clip_tokenizer,
    inspect_single_file,
    load_single_file,
    unet_config_from_ldm,
    vae_config_from_ldm,
)
from imagine.models import AutoencoderKL, UNet2DConditionModel, UNetConfig, VAEConfig

SD15_UNET = UNetConfig(sample_size=64)
SD21_UNET = UNetConfig(sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                       use_linear_projection=True)
SDXL_UNET = UNetConfig(sample_size=128, block_out_channels=(320, 640, 1280),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                       cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                       addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SD_VAE = VAEConfig()

# (key, shape) pairs read off the released files (v1-5-pruned, v2-1_768-ema-pruned, sd_xl_base_1.0)
REAL = {
    "sd1": {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.4.0.emb_layers.1.weight": (640, 1280),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    },
    "sd2": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.0.attn1.to_q.weight": (1280, 1280),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias": (3840,),
    },
}
UNET_KEYS = {"sd1": 686, "sd2": 686, "sdxl": 1680}  # tensors in the released files' UNets


def _text(hidden: int, layers: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=hidden // 64, hidden_act=act,
                            **({"projection_dim": projection} if projection else {}))
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def _full_size(arch: str) -> dict[str, torch.Tensor]:
    """A released checkpoint's key set and shapes, as imagine writes it (meta tensors: no memory)."""
    unet_cfg = {"sd1": SD15_UNET, "sd2": SD21_UNET, "sdxl": SDXL_UNET}[arch]
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(unet_cfg).state_dict(), AutoencoderKL(SD_VAE).state_dict()
    out = {**write_mapped(unet, unet_map(unet, unet_cfg)), **write_mapped(vae, vae_map(vae, SD_VAE))}
    if arch == "sd1":
        te = _text(768, 12, "quick_gelu")
        out.update(write_mapped(te, clip_map(te, TE_SD1)))
    elif arch == "sd2":
        te = _text(1024, 24, "gelu")
        out.update(write_mapped(te, open_clip_map(te, TE_SD2)))
    else:
        te1, te2 = _text(768, 12, "quick_gelu"), _text(1280, 32, "gelu", projection=1280)
        out.update(write_mapped(te1, clip_map(te1, TE_XL1)))
        out.update(write_mapped(te2, open_clip_map(te2, TE_XL2)))
    return out


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_key_maps_give_the_released_key_sets_and_detection_reads_them_back(arch):
    ldm = _full_size(arch)
    for key, shape in REAL[arch].items():
        assert key in ldm, key
        assert tuple(ldm[key].shape) == shape, key
    assert sum(k.startswith("model.diffusion_model.") for k in ldm) == UNET_KEYS[arch]
    assert sum(k.startswith("first_stage_model.") for k in ldm) == 248
    refs = {k: Ref(tuple(v.shape), lambda: None) for k, v in ldm.items()}
    info = inspect_single_file(refs, {}, f"{arch}.safetensors")
    assert info.arch == arch
    assert info.prediction == ("v" if arch == "sd2" else "eps")
    assert info.unet == {"sd1": SD15_UNET, "sd2": SD21_UNET, "sdxl": SDXL_UNET}[arch]
    assert info.vae == VAEConfig(scaling_factor=0.13025 if arch == "sdxl" else 0.18215,
                                 sample_size={"sd1": 512, "sd2": 768, "sdxl": 1024}[arch])


def test_detection_needs_the_unet_and_vae_inputs():
    with pytest.raises(CheckpointError, match="no UNet input convolution"):
        unet_config_from_ldm({}, "sd1")
    with pytest.raises(CheckpointError, match="no VAE encoder"):
        vae_config_from_ldm({}, "sd1")


def test_bundled_clip_tokenizer_is_clips():
    tok = clip_tokenizer()
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.pad_token_id == 49407
    assert clip_tokenizer("!").pad_token_id == 0  # SD 2's and SDXL's second tokenizer pad with "!"


def _save(tmp_path, tensors, name="m.safetensors", metadata=None):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_foreign_files_are_refused_with_what_was_expected(tmp_path):
    path = _save(tmp_path, {"layer.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion checkpoint: expected model\.diffusion_model"):
        load_single_file(path)
    lora = _save(tmp_path, {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)},
                 "lora.safetensors")
    with pytest.raises(CheckpointError, match="looks like a LoRA"):
        load_single_file(lora)
    vae_only = _save(tmp_path, {"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, "vae.safetensors")
    with pytest.raises(CheckpointError, match="VAE on its own: pass it with --vae"):
        load_single_file(vae_only)
    no_text = _save(tmp_path, {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "unet.safetensors")
    with pytest.raises(CheckpointError, match="no text encoder this reader knows"):
        load_single_file(no_text)


def test_truncated_and_pickled_files_are_refused(tmp_path):
    good = _save(tmp_path, {"x": torch.zeros(64, 64)})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file.*truncated or corrupt"):
        load_single_file(cut)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, ckpt)
    with pytest.raises(CheckpointError, match=r"is a pickle.*--allow-pickle"):
        open_weights(ckpt)
    weights, _ = open_weights(ckpt, allow_pickle=True)  # weights_only: tensors and nothing else
    assert list(weights) == ["model.diffusion_model.x"]

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"state_dict": {"a": Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        open_weights(tmp_path / "evil.ckpt", allow_pickle=True)


def _tiny_single_file(tmp_path, arch="sd1"):
    from imagine.io.stable_diffusion import save_single_file
    from imagine.pipelines.request import load_text_model

    pytest.importorskip("diffusers")
    from tests.tiny_sd import write_pipeline

    write_pipeline(arch, tmp_path / "pipe")
    return save_single_file(load_text_model(tmp_path / "pipe")[0], tmp_path / f"{arch}.safetensors")


def test_unknown_and_missing_tensors_are_listed(tmp_path):
    from safetensors.torch import load_file

    path = _tiny_single_file(tmp_path)
    tensors, meta = load_file(path), open_weights(path)[1]
    extra = {**tensors, "model.diffusion_model.surprise.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1 tensors no part of Stable Diffusion 1\.x uses: .*surprise"):
        load_single_file(_save(tmp_path, extra, "extra.safetensors", meta))
    tensors.pop("model.diffusion_model.out.2.weight")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors.*out\.2\.weight"):
        load_single_file(_save(tmp_path, tensors, "missing.safetensors", meta))
    ignorable = {**load_file(path), "alphas_cumprod": torch.ones(1000), "model_ema.decay": torch.ones(())}
    assert load_single_file(_save(tmp_path, ignorable, "with-buffers.safetensors", meta)).arch == "sd1"


def test_inpainting_and_instruct_unets_load_and_other_widths_are_refused(tmp_path):
    from safetensors.torch import load_file

    path = _tiny_single_file(tmp_path)
    meta = open_weights(path)[1]
    for channels, extra in ((9, 5), (8, 4), (6, None)):
        ours = json.loads(meta["imagine"])
        ours["unet"]["in_channels"] = channels
        tensors = load_file(path)
        tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, channels, 3, 3)
        saved = _save(tmp_path, tensors, f"in{channels}.safetensors", {**meta, "imagine": json.dumps(ours)})
        if extra is None:
            with pytest.raises(CheckpointError, match="6-channel UNet"):
                load_single_file(saved)
        else:
            assert load_single_file(saved).spec.conditioning_channels == extra


def test_weights_read_from_any_offset_compute_like_weights_in_fresh_memory(tmp_path):
    """A tensor a file places at an odd offset is read into aligned memory: CPU kernels round differently for
    data at other addresses, so the same weights from a diffusers folder and from a single file once gave
    images 1.8e-6 apart (safetensors 0.8 returns views of the mapped file)."""
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    # a 3-byte tensor sorted first puts every later one off 64-byte alignment in the file
    save_file({"a": torch.zeros(3, dtype=torch.uint8), "weight": conv.weight.detach().contiguous(),
               "bias": conv.bias.detach().contiguous()}, tmp_path / "w.safetensors")
    weights, _ = open_weights(tmp_path / "w.safetensors")
    read = {k: weights[k].read() for k in ("weight", "bias")}
    assert all(t.data_ptr() % 64 == 0 for t in read.values())
    x = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    fresh = torch.nn.functional.conv2d(x, conv.weight.detach().clone(), conv.bias.detach().clone(), padding=1)
    assert torch.equal(torch.nn.functional.conv2d(x, read["weight"], read["bias"], padding=1), fresh)
