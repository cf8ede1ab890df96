"""Stable Diffusion checkpoints as their owners have them, read into imagine and written back:

- diffusers pipeline folders (``model_index.json``, unet/, vae/, text_encoder/, tokenizer/, scheduler/,
  and for SDXL text_encoder_2/ and tokenizer_2/);
- single files in the original layout that A1111, ComfyUI and model sites use (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``cond_stage_model.*`` or SDXL's ``conditioner.embedders.*``): the architecture
  is read from the keys and shapes (io/ldm_keys.py holds the key maps).

SD 1.x (CLIP ViT-L, eps, 512 px), SD 2.x (OpenCLIP ViT-H read at its penultimate layer, v-prediction at
768 px unless the file says otherwise) and SDXL (CLIP ViT-L + OpenCLIP ViT-bigG, pooled text and size
micro-conditioning, 1024 px). Weights are memory-mapped and read one tensor at a time.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

from imagine import __version__
from imagine.families import (
    FLUX,
    INPAINT_PIPELINES,
    INSTRUCT_PIPELINES,
    OWN_BY_NETWORK,
    PIPELINE_FAMILIES,
    SD1,
    SD2,
    SD3,
    SDXL,
    SDXL_REFINER,
    diffusers_pipelines,
    family,
    from_diffusers,
    from_single_file,
)
from imagine.io import flux_files, sd3_files
from imagine.io.checkpoint import (
    DTYPES,
    CheckpointError,
    Weights,
    atomic_save_safetensors,
    atomic_write_bytes,
    build_and_fill,
    fresh_folder,
    open_weights,
    read_json,
)
from imagine.io.gguf_files import write_gguf
from imagine.io.ldm_keys import clip_map, open_clip_map, read_mapped, unet_map, vae_map, write_mapped
from imagine.io.model_folder import SPEC_NAME, DiffusionModel, DiffusionSpec, load_model_folder, save_model_folder
from imagine.io.networks import _config_of, diffusers_config, load_unet, load_vae
from imagine.models import AutoencoderKL, UNet2DConditionModel, UNetConfig, VAEConfig
from imagine.models.flux import FluxConfig, FluxTransformer2DModel
from imagine.models.mmdit import MMDiTConfig, SD3Transformer2DModel
from imagine.models.text_encoders import (
    CLIPTextEncoder,
    FluxTextEncoder,
    RefinerTextEncoder,
    SD3TextEncoder,
    SDXLTextEncoder,
    T5Part,
    T5TextEncoder,
    transformers_locked,
)
from imagine.nn.compact import plain_state

Arch = Literal["sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "flux", "pixart-alpha", "pixart-sigma"]
ARCH_LABELS = {f.name: f.label for f in PIPELINE_FAMILIES}
PIPELINES = diffusers_pipelines()

UNET, VAE = "model.diffusion_model.", "first_stage_model."
TE_SD1, TE_SD2 = SD1.text_encoders[0].single_file_prefix, SD2.text_encoders[0].single_file_prefix
TE_XL1, TE_XL2 = (slot.single_file_prefix for slot in SDXL.text_encoders)
# tensors a single file may carry that no model here uses: ldm's schedule buffers (top-level names),
# EMA copies, markers, OpenCLIP's logit scale and transformers' position ids
_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "logvar",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "v_pred", "ztsnr")

# The training schedule every Stable Diffusion release uses (ldm's "scaled linear", beta 0.00085 to 0.012).
SD_SCHEDULE = {"schedule": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
BOS, EOS = 49406, 49407  # CLIP's start and end of text in its BPE vocabulary


def _defaults(arch: Arch, prediction: str) -> dict:
    """How a checkpoint is sampled when the user says nothing: A1111's defaults (20 steps, CFG 7)."""
    return {**SD_SCHEDULE, "prediction": prediction, "image_size": family(arch).image_size, "latent": True,
            "default_sampler": "dpmpp_2m", "default_steps": 20, "default_cfg": 7.0,
            "zero_empty_negative": family(arch).zero_empty_negative}


def kind_of(path: Path) -> Literal["imagine", "diffusers", "single-file"]:
    """What a --model path is, or a CheckpointError that says what was expected."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no model at {path}")
    if path.is_file():
        if path.suffix in (".safetensors", ".gguf", ".ckpt", ".pt", ".pth", ".bin"):
            return "single-file"
        raise CheckpointError(f"{path} is not a checkpoint: expected a .safetensors or .gguf (or, with "
                              "--allow-pickle, .ckpt) file, an imagine model folder or a diffusers pipeline folder")
    if (path / SPEC_NAME).exists():
        return "imagine"
    if (path / "model_index.json").exists():
        return "diffusers"
    found = sorted(p.name for p in path.iterdir())[:10] or "nothing"
    raise CheckpointError(f"{path} is neither an imagine model folder ({SPEC_NAME}) nor a diffusers pipeline "
                          f"folder (model_index.json); found {found}")


# --- the CLIP tokenizer ------------------------------------------------------------------------------

BPE_FILE = Path(__file__).resolve().parent.parent / "weights" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=2)
@transformers_locked
def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """CLIP's tokenizer (49408 tokens) from the BPE merges imagine ships: single files carry no tokenizer,
    and SD 1.x, 2.x and SDXL all use this one (SD 2's and SDXL's second pad with "!", the others with
    end-of-text). The vocabulary is built as CLIP builds it: bytes, bytes + "</w>", merges, specials."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1: 49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    words = [*base, *(b + "</w>" for b in base), *("".join(m) for m in merges), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=merges, pad_token=pad_token,
                         model_max_length=77)


# --- text encoders from tensors ----------------------------------------------------------------------

@transformers_locked
def _text_config(weights: Weights, *, act: str, projection: bool):
    from transformers import CLIPTextConfig

    vocab, hidden = weights["embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layers."))
    config = dict(vocab_size=vocab, hidden_size=hidden,
                  intermediate_size=weights["encoder.layers.0.mlp.fc1.weight"].shape[0], num_hidden_layers=layers,
                  num_attention_heads=max(1, hidden // 64),
                  max_position_embeddings=weights["embeddings.position_embedding.weight"].shape[0],
                  hidden_act=act, layer_norm_eps=1e-5, bos_token_id=BOS if vocab > EOS else 0,
                  eos_token_id=EOS if vocab > EOS else 1, pad_token_id=1)
    if projection:
        config["projection_dim"] = weights["text_projection.weight"].shape[0]
    return CLIPTextConfig(**config)


def _restore_position_ids(model) -> None:
    embeddings = getattr(model, "text_model", model).embeddings
    n = embeddings.position_embedding.weight.shape[0]
    embeddings.register_buffer("position_ids", torch.arange(n).expand((1, -1)), persistent=False)


@transformers_locked
def _text_model(weights: Weights, config, projection: bool, source: str):
    """A transformers CLIP text model filled from ``weights`` (keys without ``text_model.``)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with torch.device("meta"):
        probe = cls(config)
    prefixed = next(iter(probe.state_dict())).startswith("text_model.")

    def own(key: str) -> str:
        return key if (not prefixed or key == "text_projection.weight") else "text_model." + key

    model = build_and_fill(lambda: cls(config), {own(k): r for k, r in weights.items()}, source,
                           restore=_restore_position_ids)
    return model.eval()


def _canonical(model) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's tensors under keys without ``text_model.``, position ids dropped."""
    return {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


# --- single files ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SingleFile:
    arch: Arch
    unet: object  # UNetConfig
    vae: object  # VAEConfig
    prediction: str
    text_configs: list[dict] | None = None  # transformers configs, where imagine wrote the file
    clip_skip: int | None = None  # the layer the stored text encoder is read at, where imagine wrote the file


def _single_file_spec(info: SingleFile) -> dict:
    """How a single file is sampled; its native size is the UNet's sample size in pixels (512, 768 or 1024
    for the releases)."""
    return {**_defaults(info.arch, info.prediction), "image_size": info.unet.sample_size * info.vae.downscale,
            "conditioning_channels": info.unet.in_channels - info.vae.latent_channels}


def _strip(weights: Weights, prefix: str) -> Weights:
    return {k[len(prefix):]: r for k, r in weights.items() if k.startswith(prefix)}


def _count(keys, prefix: str) -> int:
    found = [int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)]
    return 1 + max(found) if found else 0


def unet_config_from_ldm(w: Weights, arch: Arch):
    """The UNet's config from the shapes of ``model.diffusion_model.*`` (keys without that prefix).
    Head counts are not in any tensor: SD 1.x uses 8 heads, SD 2.x and SDXL 64-wide heads, as their
    reference configs say."""
    if "input_blocks.0.0.weight" not in w:
        raise CheckpointError("no UNet input convolution (model.diffusion_model.input_blocks.0.0.weight)")
    in_channels = w["input_blocks.0.0.weight"].shape[1]
    n_in = _count(w, "input_blocks.")
    first_down = next((i for i in range(n_in) if f"input_blocks.{i}.0.op.weight" in w), None)
    layers = (first_down - 1) if first_down is not None else n_in - 1
    levels = n_in // (layers + 1)
    encoder_only = _count(w, "output_blocks.") == 0 and "input_hint_block.0.weight" in w  # a ControlNet
    n_out = _count(w, "output_blocks.")
    if levels * (layers + 1) != n_in or (n_out != levels * (layers + 1) and not encoder_only):
        raise CheckpointError(f"unexpected UNet layout: {n_in} input blocks and {_count(w, 'output_blocks.')} "
                              f"output blocks for {layers} layers per level")
    channels, down, up, depth = [], [], [], []
    for i in range(levels):
        block = f"input_blocks.{1 + i * (layers + 1)}."
        channels.append(w[block + "0.out_layers.3.weight"].shape[0])
        attn = f"{block}1.proj_in.weight" in w
        down.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        depth.append(_count(w, f"{block}1.transformer_blocks.") if attn else 1)
    for i in range(levels):
        if encoder_only:  # mirrored, as the UNet it was copied from has them
            up.append(down[levels - 1 - i].replace("Down", "Up"))
        else:
            up.append("CrossAttnUpBlock2D" if f"output_blocks.{i * (layers + 1)}.1.proj_in.weight" in w
                      else "UpBlock2D")
    context = next((r.shape[1] for k, r in w.items() if k.endswith("attn2.to_k.weight")), 768)
    linear = next((len(r.shape) == 2 for k, r in w.items() if k.endswith(".proj_in.weight")), False)
    mid = "middle_block.1.proj_in.weight" in w
    if mid and _count(w, "middle_block.1.transformer_blocks.") != depth[-1]:
        raise CheckpointError("the middle block's transformer depth differs from the last level's, which "
                              "imagine's UNet does not implement")
    heads = family(arch).attention_heads or tuple(max(1, c // 64) for c in channels)
    extra = {}
    if "label_emb.0.0.weight" in w:
        adm = w["label_emb.0.0.weight"].shape[1]
        pooled = 1280
        ids = 5 if family(arch).aesthetic_score else 6  # the refiner's aesthetic score in place of the target size
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=(adm - pooled) // ids,
                     projection_class_embeddings_input_dim=adm)
    fam = family(arch)
    return UNetConfig(sample_size=fam.image_size // fam.latent.downscale, in_channels=in_channels,
                      out_channels=w["out.2.weight"].shape[0] if "out.2.weight" in w else in_channels,
                      block_out_channels=tuple(channels),
                      down_block_types=tuple(down), up_block_types=tuple(up),
                      mid_block_type="UNetMidBlock2DCrossAttn" if mid else None, layers_per_block=layers,
                      cross_attention_dim=context, attention_head_dim=heads,
                      transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else tuple(depth),
                      use_linear_projection=linear, **extra)


def vae_config_from_ldm(w: Weights, arch: Arch, norm_num_groups: int = 32):
    """The VAE's config from the shapes of ``first_stage_model.*`` (keys without that prefix)."""
    if "encoder.conv_in.weight" not in w:
        raise CheckpointError("no VAE encoder (first_stage_model.encoder.conv_in.weight)")
    levels = _count(w, "encoder.down.")
    channels = tuple(w[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels))
    return VAEConfig(in_channels=w["encoder.conv_in.weight"].shape[1],
                     out_channels=w["decoder.conv_out.weight"].shape[0],
                     block_out_channels=channels, layers_per_block=_count(w, "encoder.down.0.block."),
                     latent_channels=w["decoder.conv_in.weight"].shape[1], sample_size=family(arch).image_size,
                     scaling_factor=family(arch).latent.scaling_factor, use_quant_conv="quant_conv.weight" in w,
                     norm_num_groups=norm_num_groups,
                     use_post_quant_conv="post_quant_conv.weight" in w)


def inspect_single_file(weights: Weights, metadata: dict[str, str], source: str) -> SingleFile:
    """Which Stable Diffusion a single file holds, from its keys and shapes (and its metadata where it
    has imagine's or modelspec's), or a CheckpointError naming what was expected and what was found."""
    keys = list(weights)
    if not any(k.startswith(UNET) for k in keys):
        sample = ", ".join(keys[:4]) or "no tensors"
        hint = ""
        if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k for k in keys):
            hint = " It looks like a LoRA: those go in models/Lora, not --model."
        elif any(k.startswith(("down_blocks.", "encoder.down_blocks.")) for k in keys):
            hint = " It looks like one diffusers component: pass the whole pipeline folder (with model_index.json)."
        elif any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
            hint = " It looks like a VAE on its own: pass it with --vae."
        raise CheckpointError(f"{source} is not a Stable Diffusion checkpoint: expected model.diffusion_model.*, "
                              f"first_stage_model.* and cond_stage_model.* (or conditioner.embedders.*) keys; "
                              f"found {sample}.{hint}")
    found = from_single_file(keys)
    if found is None:
        raise CheckpointError(f"{source} has a UNet but no text encoder this reader knows: expected "
                              f"{TE_SD1}* (SD 1.x), {TE_SD2}* (SD 2.x), {TE_XL2}* (SDXL) or "
                              f"{SDXL_REFINER.text_encoders[0].single_file_prefix}* (the SDXL refiner)")
    arch: Arch = found.name
    ours = json.loads(metadata["imagine"]) if "imagine" in metadata else None
    if ours is not None:  # written by imagine: its configs say what shapes cannot (head counts, groups)
        unet, vae = UNetConfig.from_dict(ours["unet"]), VAEConfig.from_dict(ours["vae"])
    else:
        unet, vae = unet_config_from_ldm(_strip(weights, UNET), arch), vae_config_from_ldm(_strip(weights, VAE), arch)
    if unet.in_channels not in (4, 8, 9):
        raise CheckpointError(f"{source} is a {unet.in_channels}-channel UNet; imagine runs 4-channel text-to-image, "
                              "9-channel inpainting and 8-channel instruct (InstructPix2Pix) checkpoints")
    prediction = found.prediction
    if "v_pred" in weights:  # the marker key v-prediction SDXL finetunes carry
        prediction = "v"
    declared = (ours or {}).get("prediction") or metadata.get("modelspec.prediction_type")
    if declared:
        prediction = PREDICTIONS.get(declared, declared)
    return SingleFile(arch, unet, vae, prediction, (ours or {}).get("text"), (ours or {}).get("clip_skip"))


@transformers_locked
def _text_encoder_from_file(weights: Weights, arch: Arch, source: str, clip_skip: int | None,
                            configs: list[dict] | None = None, stored_skip: int | None = None):
    """The checkpoint's text encoder(s); ``configs``: transformers configs imagine wrote in the metadata
    (head counts are in no tensor; without them SD's 64-wide heads are assumed)."""
    from transformers import CLIPTextConfig


    def config(i: int, w: Weights, act: str, projection: bool):
        if configs:
            return CLIPTextConfig(**{k: v for k, v in configs[i].items() if k not in ("transformers_version",)})
        return _text_config(w, act=act, projection=projection)

    name = Path(source).name
    if arch == "sd1":
        prefix = TE_SD1 + "text_model." if any(k.startswith(TE_SD1 + "text_model.") for k in weights) else TE_SD1
        w = _strip(weights, prefix)
        model = _text_model(w, config(0, w, "quick_gelu", False), False, source)
        return CLIPTextEncoder(clip_tokenizer(), model, f"CLIP ViT-L/14 ({name})", clip_skip or 1)
    if arch == "sd2":
        w = _openclip(weights, TE_SD2, projection=False)
        model = _text_model(w, config(0, w, "gelu", False), False, source)
        # SD 2 reads OpenCLIP ViT-H (24 layers) at its penultimate layer, through the final norm, as A1111
        # does: clip skip 2. A file converted from diffusers holds 23 layers, the last one the one used.
        default = stored_skip or (1 if model.config.num_hidden_layers == 23 else 2)
        return CLIPTextEncoder(clip_tokenizer("!"), model, f"OpenCLIP ViT-H/14 ({name})", clip_skip or default)
    if arch == "sdxl-refiner":  # OpenCLIP bigG alone, where SDXL keeps CLIP-L
        w = _openclip(weights, SDXL_REFINER.text_encoders[0].single_file_prefix, projection=True)
        model = _text_model(w, config(0, w, "gelu", True), True, source)
        return RefinerTextEncoder(clip_tokenizer("!"), model, f"SDXL refiner bigG ({name})", clip_skip or 2)
    w1 = _strip(weights, TE_XL1 + "text_model.")
    w2 = _openclip(weights, TE_XL2, projection=True)
    m1 = _text_model(w1, config(0, w1, "quick_gelu", False), False, source)
    m2 = _text_model(w2, config(1, w2, "gelu", True), True, source)
    return SDXLTextEncoder((clip_tokenizer(), clip_tokenizer("!")), (m1, m2), f"SDXL CLIP-L + bigG ({name})",
                           clip_skip or 2)


def _openclip(weights: Weights, prefix: str, projection: bool) -> Weights:
    """OpenCLIP text-tower tensors under transformers' CLIP names (without ``text_model.``)."""
    layers = _count(weights, prefix + "transformer.resblocks.")
    keys = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
            "final_layer_norm.weight", "final_layer_norm.bias"]
    for i in range(layers):
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"encoder.layers.{i}.{module}.weight", f"encoder.layers.{i}.{module}.bias"]
    if projection:
        keys.append("text_projection.weight")
    return read_mapped(weights, open_clip_map(keys, prefix), "the text encoder")


def _ignorable(key: str) -> bool:
    return ("." not in key and key in _SCHEDULE_BUFFERS) or key.startswith("model_ema.") or key.endswith(
        ("position_ids", "logit_scale", ".attn_mask"))


def load_single_file(path: Path, *, allow_pickle: bool = False, clip_skip: int | None = None,
                     dtype: torch.dtype = torch.float32, modules: Sequence[Path] = ()) -> DiffusionModel:
    """A single-file checkpoint: SD 1.x, 2.x or SDXL (UNet, VAE and text encoder(s)), or an SD3 or Flux
    transformer file with its separate parts (``modules``: text encoder and VAE files, as Forge's "modules"),
    every tensor accounted for (an unknown key is an error, never silently dropped)."""
    path = Path(path)
    weights, metadata = open_weights(path, allow_pickle)
    if sd3_files.transformer_prefix(weights) is not None:
        return _load_sd3_file(path, weights, metadata, clip_skip, dtype, modules)
    if flux_files.transformer_prefix(weights) is not None:
        return _load_flux_file(path, weights, metadata, clip_skip, dtype, modules)
    if modules:
        raise CheckpointError(f"{path} carries its own text encoders and VAE; separate text encoder files "
                              "(--text-encoder) are for SD3 and Flux transformer files (use --vae for a VAE)")
    info = inspect_single_file(weights, metadata, str(path))
    with torch.device("meta"):
        unet_keys = list(UNet2DConditionModel(info.unet).state_dict())
        vae_keys = list(AutoencoderKL(info.vae).state_dict())
    maps = unet_map(unet_keys, info.unet), vae_map(vae_keys, info.vae)
    unet_refs, vae_refs = (read_mapped(weights, key_map, str(path)) for key_map in maps)
    used = {src.key for key_map in maps for src in key_map.values()}
    text_prefixes = tuple(slot.single_file_prefix for slot in family(info.arch).text_encoders)
    unknown = [k for k in weights if k not in used and not k.startswith(text_prefixes) and not _ignorable(k)]
    if unknown:
        raise CheckpointError(f"{path} holds {len(unknown)} tensors no part of {ARCH_LABELS[info.arch]} uses: "
                              f"{', '.join(unknown[:10])}")
    unet = build_and_fill(lambda: UNet2DConditionModel(info.unet), unet_refs, f"{path} (UNet)", dtype).eval()
    vae = build_and_fill(lambda: AutoencoderKL(info.vae), vae_refs, f"{path} (VAE)").eval()
    text_encoder = _text_encoder_from_file(weights, info.arch, str(path), clip_skip, info.text_configs,
                                           info.clip_skip)
    spec = DiffusionSpec(**_single_file_spec(info), text_encoder=text_encoder.identity)
    return DiffusionModel(unet, vae, spec, path, text_encoder=text_encoder, arch=info.arch, hash_file=path)


# --- Stable Diffusion 3 single files (io/sd3_files.py holds the key maps) ----------------------------

def _sd3_file_spec(image_size: int) -> dict:
    """How an SD3 single file is sampled (its scheduler is not in the file: SD3's release settings)."""
    return {**_defaults("sd3", "flow"), "flow_shift": 3.0, "image_size": image_size, "default_sampler": "euler",
            "default_steps": 28, "default_cfg": 7.0}


def _flux_file_spec(dev: bool, image_size: int) -> dict:
    """How a Flux single file is sampled: [dev] with the resolution-dependent shift, 28 steps and the distilled
    guidance; [schnell] with neither, 4 steps; both without CFG."""
    return {**_defaults("flux", "flow"), "flow_shift": 3.0 if dev else 1.0, "flow_dynamic_shift": dev,
            "flow_grid_end": "steps", "default_sampler": "euler", "default_steps": 28 if dev else 4,
            "default_cfg": 1.0, "distilled_guidance": dev, "image_size": image_size}


def _load_sd3_file(path: Path, weights: Weights, metadata: dict[str, str], clip_skip: int | None,
                   dtype: torch.dtype, modules: Sequence[Path] = ()) -> DiffusionModel:
    """An SD3 / SD3.5 single file: the MMDiT, the VAE and CLIP-L, CLIP-G and (optionally) T5, from the file
    (all-in-one saves) or from separate files (Stability's and ComfyUI's text_encoders/), every tensor accounted
    for."""
    prefix = sd3_files.transformer_prefix(weights)
    ours = json.loads(metadata["imagine"]) if "imagine" in metadata else {}
    cfg = MMDiTConfig.from_dict(ours["transformer"]) if "transformer" in ours else \
        sd3_files.config_from_original(_strip(weights, prefix))
    key_map = sd3_files.transformer_map(cfg, prefix)
    transformer_refs = read_mapped(weights, key_map, str(path))
    used = {src.key for src in key_map.values()}
    inside = {"clip_l": (sd3_files.CLIP_L,), "clip_g": (sd3_files.CLIP_G,), "t5": (sd3_files.T5,), "vae": (VAE,)}
    unknown = [k for k in weights if k not in used and not k.startswith(tuple(p for ps in inside.values() for p in ps))
               and not _ignorable(k)]
    if unknown:
        raise CheckpointError(f"{path} holds {len(unknown)} tensors no part of Stable Diffusion 3 uses: "
                              f"{', '.join(unknown[:10])}")
    parts, separate = _separate_parts(path, weights, inside, ("clip_l", "clip_g", "vae"), ("t5",), modules)
    vae_weights, vae_source = parts["vae"]
    vae_cfg = VAEConfig.from_dict(ours["vae"]) if "vae" in ours else replace(
        vae_config_from_ldm(vae_weights, "sd3"), shift_factor=SD3.latent.shift_factor)
    with torch.device("meta"):
        vae_keys = list(AutoencoderKL(vae_cfg).state_dict())
    vae_refs = read_mapped(vae_weights, vae_map(vae_keys, vae_cfg, ""), vae_source)
    net = build_and_fill(lambda: SD3Transformer2DModel(cfg), transformer_refs, f"{path} (MMDiT)", dtype).eval()
    vae = build_and_fill(lambda: AutoencoderKL(vae_cfg), vae_refs, vae_source).eval()
    clips = []
    written = ours.get("text") or [None, None, None]  # imagine's files: the configs shapes cannot give (heads)
    for i, (part, act) in enumerate((("clip_l", "quick_gelu"), ("clip_g", "gelu"))):
        part_weights, source = parts[part]
        w = {k.removeprefix("text_model."): r for k, r in part_weights.items() if not k.endswith("position_ids")}
        if "text_projection.weight" not in w:
            raise CheckpointError(f"{source} has no text_projection: SD3 reads both CLIPs' projected pooled "
                                  "outputs (a CLIP-L saved for SD 1.x or Flux lacks it; use SD3's clip_l file)")
        config = _clip_config_from_dict(written[i]) if written[i] else _text_config(w, act=act, projection=True)
        clips.append(_text_model(w, config, True, source))
    t5 = None
    if "t5" in parts:
        t5_weights, t5_source = parts["t5"]
        folder = sd3_files.t5_tokenizer_folder(path) or sd3_files.t5_tokenizer_folder(
            Path(t5_source.split(" (")[0]))
        if folder is None:
            raise CheckpointError(f"{path} comes with T5-XXL ({t5_source}) but no tokenizer for it (a single file "
                                  f"holds none): put T5's tokenizer folder (tokenizer_3/ of the diffusers SD3 "
                                  f"release: spiece.model or tokenizer.json) beside the file as "
                                  f"{path.parent / 'tokenizer_3'}")
        t5 = T5Part(_t5_tokenizer(folder), sd3_files.t5_from_weights(t5_weights, t5_source, written[2]), 256)
    encoder = SD3TextEncoder((clip_tokenizer(), clip_tokenizer("!")), tuple(clips), f"SD3:{path.stem}", t5,
                             t5.dim if t5 is not None else cfg.joint_attention_dim, 256,
                             clip_skip or SD3.clip_skip)
    spec = DiffusionSpec(**_sd3_file_spec(cfg.sample_size * 8), text_encoder=encoder.identity)
    return DiffusionModel(net, vae, spec, path, text_encoder=encoder, arch="sd3", hash_file=path,
                          module_paths=separate)


@transformers_locked
def _clip_config_from_dict(data: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig.from_dict(data)


@transformers_locked
def _t5_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _sd3_file_state(model: DiffusionModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An SD3 model's tensors in the single-file layout, and imagine's configs for its metadata."""
    state = sd3_files.transformer_map(model.unet.config)
    out = write_mapped(plain_state(model.unet), state)
    with torch.device("meta"):
        vae_keys = list(AutoencoderKL(model.vae.config).state_dict())
    out.update(write_mapped(model.vae.state_dict(), vae_map(vae_keys, model.vae.config)))
    te = model.text_encoder
    for prefix, clip in ((sd3_files.CLIP_L, te.model_1), (sd3_files.CLIP_G, te.model_2)):
        for key, value in _canonical(clip).items():
            out[prefix + (key if key == "text_projection.weight" else "text_model." + key)] = value
    if te.t5 is not None:
        for key, value in te.t5.model.state_dict().items():
            if key != "encoder.embed_tokens.weight":  # tied to shared.weight
                out[sd3_files.T5 + key] = value
    text = [json.loads(m.config.to_json_string()) for m in (te.model_1, te.model_2)]
    text.append(json.loads(te.t5.model.config.to_json_string()) if te.t5 is not None else None)
    meta = {"imagine": json.dumps({"transformer": _config_of(model.unet), "vae": _config_of(model.vae),
                                   "text": text}),
            "modelspec.architecture": SD3.modelspec, "format": "pt"}
    return out, meta


# --- Flux single files (io/flux_files.py holds the key map) ------------------------------------------

# where a transformer file's separate parts (Forge's "modules") are looked for when the file lacks them: the
# files the user names first (--text-encoder, Forge's forge_additional_modules), then beside it, then in the models
# folder's sections as Forge (text_encoder/, VAE/) and ComfyUI (text_encoders/, clip/, vae/) lay them out
COMPONENT_SECTIONS = ("text_encoders", "text_encoder", "clip", "VAE", "vae")
PART_FILES = {"clip_l": "CLIP-L (clip_l.safetensors)", "clip_g": "CLIP-G (clip_g.safetensors)",
              "t5": "T5-XXL (t5xxl_fp16.safetensors)", "vae": "its VAE (ae.safetensors)"}


def _component_kind(weights: Weights, name: str = "") -> str | None:
    """What a separate file is: CLIP-L or CLIP-G (by width, 768 or 1280; other widths by the file's name), T5's
    encoder or a VAE; None if none."""
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in weights:
        return "t5"
    embedding = weights.get("text_model.embeddings.token_embedding.weight",
                            weights.get("embeddings.token_embedding.weight"))
    if embedding is not None:  # transformers' CLIP layout, with or without text_model.
        width = embedding.shape[1]
        return "clip_g" if width == 1280 or (width != 768 and "clip_g" in name.lower()) else "clip_l"
    if "encoder.down.0.block.0.norm1.weight" in weights or "encoder.conv_in.weight" in weights:
        return "vae"
    return None


def _separate_file(path: Path) -> tuple[Weights, dict[str, str]]:
    """A separate part's tensors, a CLIP in OpenCLIP's layout read under transformers' names."""
    weights, metadata = open_weights(path, False)
    if "transformer.resblocks.0.attn.in_proj_weight" in weights and "token_embedding.weight" in weights:
        return _openclip(weights, "", "text_projection" in weights), metadata
    return weights, metadata


def _separate_parts(path: Path, weights: Weights, inside: dict[str, tuple[str, ...]], needed: tuple[str, ...],
                    optional: tuple[str, ...] = (), given: Sequence[Path] = ()) -> tuple[dict, list[Path]]:
    """A transformer file's parts: kind -> (tensors without their prefix, where they came from), and the separate
    files used. Each part comes from the file itself (an all-in-one save) under one of ``inside``'s prefixes,
    else from a ``given`` file, else from a file beside it or in the models folder's sections. A given file that
    is none of the parts, or a part this family does not read, is an error, never ignored."""
    found: dict[str, tuple[Weights, str]] = {}
    used: list[Path] = []
    for kind, prefixes in inside.items():
        for prefix in prefixes:
            part = _strip(weights, prefix)
            if part:
                found[kind] = (part, f"{path} ({prefix}*)")
                break
    wanted = (*needed, *optional)
    for file in given:
        part, _ = _separate_file(Path(file))
        kind = _component_kind(part, Path(file).name)
        if kind not in wanted:
            what = PART_FILES[kind].split(" (")[0] if kind else "no text encoder or VAE imagine knows"
            raise CheckpointError(f"{file} is {what}; {path.name} reads {', '.join(PART_FILES[k] for k in wanted)}")
        if kind in found and found[kind][1] != str(file):
            raise CheckpointError(f"{file} is a second {PART_FILES[kind]} for {path.name} (it already has one from "
                                  f"{found[kind][1]}): pass one file per part")
        found[kind] = (part, str(file))
        used.append(Path(file))
    folders = [path.parent, *(path.parent.parent / name for name in COMPONENT_SECTIONS),
               *(path.parent / name for name in COMPONENT_SECTIONS)]
    for folder in folders:
        if all(k in found for k in wanted) or not folder.is_dir():
            continue
        for candidate in sorted(folder.glob("*.safetensors")):
            if candidate.resolve() == path.resolve():
                continue
            part, _ = _separate_file(candidate)
            kind = _component_kind(part, candidate.name)
            if kind in wanted and kind not in found:
                found[kind] = (part, str(candidate))
                used.append(candidate)
    missing = [kind for kind in needed if kind not in found]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(PART_FILES[k] for k in missing)}: pass the file(s) with "
                              f"--text-encoder FILE (repeatable), or put them beside it or in the models folder's "
                              f"text_encoders/ (or clip/) and VAE/, or use the diffusers folder")
    return found, used


def _load_flux_file(path: Path, weights: Weights, metadata: dict[str, str], clip_skip: int | None,
                    dtype: torch.dtype, modules: Sequence[Path] = ()) -> DiffusionModel:
    """A Flux.1 [dev] or [schnell] transformer file (BFL's layout) with its CLIP-L, T5 and VAE found in it or
    beside it (as ComfyUI and Forge users keep them)."""
    prefix = flux_files.transformer_prefix(weights)
    ours = json.loads(metadata["imagine"]) if "imagine" in metadata else {}
    cfg = FluxConfig.from_dict(ours["transformer"]) if "transformer" in ours else \
        flux_files.config_from_original(_strip(weights, prefix))
    key_map = flux_files.transformer_map(cfg, prefix)
    refs = read_mapped(weights, key_map, str(path))
    used = {src.key for src in key_map.values()}
    inside = (flux_files.CLIP_L, flux_files.T5, flux_files.VAE, VAE)
    unknown = [k for k in weights if k not in used and not k.startswith(inside) and not _ignorable(k)]
    if unknown:
        raise CheckpointError(f"{path} holds {len(unknown)} tensors Flux.1's transformer does not have (a Fill, "
                              f"Depth, Redux or other variant imagine does not run yet?): {', '.join(unknown[:10])}")
    parts, used = _separate_parts(path, weights, {"clip_l": (flux_files.CLIP_L,), "t5": (flux_files.T5,),
                                                  "vae": (flux_files.VAE, VAE)}, ("clip_l", "t5", "vae"),
                                  given=modules)
    net = build_and_fill(lambda: FluxTransformer2DModel(cfg), refs, f"{path} (Flux)", dtype).eval()
    vae_weights, vae_source = parts["vae"]
    vae_cfg = VAEConfig.from_dict(ours["vae"]) if "vae" in ours else replace(
        vae_config_from_ldm(vae_weights, "flux"), shift_factor=FLUX.latent.shift_factor)
    with torch.device("meta"):
        vae_keys = list(AutoencoderKL(vae_cfg).state_dict())
    vae = build_and_fill(lambda: AutoencoderKL(vae_cfg), read_mapped(vae_weights, vae_map(vae_keys, vae_cfg, ""),
                                                                      vae_source), vae_source).eval()
    written = ours.get("text") or [None, None]
    clip_weights, clip_source = parts["clip_l"]
    w = {k.removeprefix("text_model."): r for k, r in clip_weights.items()
         if not k.endswith("position_ids") and k != "text_projection.weight"}
    clip_config = _clip_config_from_dict(written[0]) if written[0] else _text_config(w, act="quick_gelu",
                                                                                     projection=False)
    clip = _text_model(w, clip_config, False, clip_source)
    t5_weights, t5_source = parts["t5"]
    folder = sd3_files.t5_tokenizer_folder(path, "tokenizer_2") or sd3_files.t5_tokenizer_folder(
        Path(t5_source.split(" (")[0]), "tokenizer_2")
    if folder is None:
        raise CheckpointError(f"{path}: T5-XXL needs its tokenizer, which no single file carries: put T5's "
                              f"tokenizer folder (tokenizer_2/ of the diffusers FLUX.1 release: spiece.model or "
                              f"tokenizer.json) beside the file as {path.parent / 'tokenizer_2'}")
    t5 = T5Part(_t5_tokenizer(folder), sd3_files.t5_from_weights(t5_weights, t5_source, written[1]), 512)
    encoder = FluxTextEncoder(clip_tokenizer(), clip, f"Flux:{path.stem}", t5)
    dev = cfg.guidance_embeds  # [dev]: the resolution-dependent shift and 28 steps; [schnell]: neither, 4 steps
    spec = DiffusionSpec(**_flux_file_spec(dev, 128 * vae_cfg.downscale), text_encoder=encoder.identity)
    return DiffusionModel(net, vae, spec, path, text_encoder=encoder, arch="flux", hash_file=path,
                          module_paths=used)


def _flux_file_state(model: DiffusionModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A Flux model as ComfyUI's all-in-one checkpoint saves it: the transformer in Black Forest Labs' layout under
    ``model.diffusion_model.``, CLIP-L and T5 under ``text_encoders.*.transformer.``, the VAE under ``vae.``; with
    imagine's configs in the metadata."""
    out = {"model.diffusion_model." + k: v for k, v in
           write_mapped(plain_state(model.unet), flux_files.transformer_map(model.unet.config)).items()}
    with torch.device("meta"):
        vae_keys = list(AutoencoderKL(model.vae.config).state_dict())
    out.update({flux_files.VAE + k: v for k, v in
                write_mapped(model.vae.state_dict(), vae_map(vae_keys, model.vae.config, "")).items()})
    te = model.text_encoder
    for key, value in _canonical(te.model).items():
        out[flux_files.CLIP_L + "text_model." + key] = value
    for key, value in te.t5.model.state_dict().items():
        if key != "encoder.embed_tokens.weight":  # tied to shared.weight
            out[flux_files.T5 + key] = value
    text = [json.loads(te.model.config.to_json_string()), json.loads(te.t5.model.config.to_json_string())]
    meta = {"imagine": json.dumps({"transformer": _config_of(model.unet), "vae": _config_of(model.vae),
                                   "text": text}),
            "modelspec.architecture": "flux-1-dev" if model.unet.config.guidance_embeds else "flux-1-schnell",
            "format": "pt"}
    return out, meta


# --- diffusers pipeline folders ----------------------------------------------------------------------

def spec_from_scheduler(config: dict, arch: Arch, image_size: int) -> dict:
    """Training schedule and prediction type from a diffusers scheduler_config.json; the sampler is the
    user's to choose (A1111 does the same), so its class and spacing only inform nothing here."""
    if config.get("trained_betas") is not None:
        raise CheckpointError("this scheduler lists trained_betas, which imagine does not read; its beta_schedule "
                              "must name the schedule")
    name = config.get("beta_schedule", "scaled_linear")
    if name not in BETA_SCHEDULES:
        raise CheckpointError(f"beta_schedule {name!r} unknown; imagine reads {', '.join(BETA_SCHEDULES)}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise CheckpointError(f"prediction_type {prediction!r} unknown; imagine reads {', '.join(PREDICTIONS)}")
    if str(config.get("_class_name", "")).startswith("FlowMatch"):  # rectified flow (SD3, Flux): its shifts
        dynamic = bool(config.get("use_dynamic_shifting", False))
        return {**_defaults(arch, "flow"), "prediction": "flow", "flow_shift": float(config.get("shift", 1.0)),
                "flow_dynamic_shift": dynamic,
                "flow_shift_range": (float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))),
                "flow_token_range": (int(config.get("base_image_seq_len", 256)),
                                     int(config.get("max_image_seq_len", 4096))),
                "flow_grid_end": family(arch).flow_grid_end,
                "num_train_timesteps": int(config.get("num_train_timesteps", 1000)), "image_size": image_size,
                "default_sampler": "euler", "default_steps": 28, "default_cfg": 7.0}
    lcm = {"consistency": True, "default_sampler": "lcm", "default_steps": 4} \
        if config.get("_class_name") == "LCMScheduler" else {}
    return {**_defaults(arch, PREDICTIONS[prediction]), **lcm, "schedule": BETA_SCHEDULES[name],
            "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
            "beta_start": float(config.get("beta_start", 0.00085)), "beta_end": float(config.get("beta_end", 0.012)),
            "zero_terminal_snr": bool(config.get("rescale_betas_zero_snr", False)), "image_size": image_size}


def _pipeline_spec(path: Path, index: dict, arch: Arch) -> dict:
    """How a diffusers pipeline folder is sampled: its scheduler's schedule and prediction, the denoiser's
    sample size times the VAE's factor, and force_zeros_for_empty_prompt; read from the JSON files alone."""
    fam = family(arch)
    unet, vae = read_json(path / fam.denoiser_folder / "config.json"), read_json(path / "vae" / "config.json")
    factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    size = unet.get("sample_size", fam.image_size // 8) * factor  # Flux's config has none: its pipeline's 128
    scheduler = path / "scheduler" / "scheduler_config.json"
    spec = spec_from_scheduler(read_json(scheduler) if scheduler.exists() else {}, arch, size)
    if "guidance_embeds" in unet:  # Flux: no CFG; [dev] embeds a distilled guidance scale, [schnell] takes 4 steps
        spec.update(default_cfg=1.0, default_steps=28 if unet["guidance_embeds"] else 4,
                    distilled_guidance=bool(unet["guidance_embeds"]))
    extra = unet.get("in_channels", 4) - vae.get("latent_channels", 4)
    if extra in (4, 5) and fam.network == "unet":  # instruct (the image's latents) or inpainting (mask and image)
        spec["conditioning_channels"] = extra
    if unet.get("out_channels") and unet["out_channels"] == 2 * unet.get("in_channels", 0):  # PixArt's variance
        spec.update(learned_variance=True, default_cfg=4.5)
    if spec.get("consistency"):  # an LCM embeds its guidance scale (LCM-Dreamshaper's 8) or runs without CFG
        spec["default_cfg"] = 8.0 if unet.get("time_cond_proj_dim") else 1.0
    return {**spec, "zero_empty_negative": bool(index.get("force_zeros_for_empty_prompt",
                                                            family(arch).zero_empty_negative))}


def _pipeline_family(path: Path, index: dict):
    """The family of a diffusers pipeline folder whose model_index.json imagine reads."""
    config = path / "text_encoder" / "config.json"
    found = from_diffusers(index.get("_class_name"), read_json(config) if config.exists() else {})
    if found is None:
        raise CheckpointError(f"{path} holds a diffusers {index.get('_class_name')}; imagine reads "
                              f"{' and '.join(PIPELINES)} folders")
    return found


def load_diffusers_pipeline(path: Path, *, clip_skip: int | None = None,
                            dtype: torch.dtype = torch.float32) -> DiffusionModel:
    """A diffusers StableDiffusionPipeline, StableDiffusionXLPipeline or StableDiffusion3Pipeline folder."""
    path = Path(path)
    index = read_json(path / "model_index.json")
    cls = index.get("_class_name")
    if cls not in PIPELINES:
        raise CheckpointError(f"{path} holds a diffusers {cls}; imagine reads {' and '.join(PIPELINES)} folders")
    fam = _pipeline_family(path, index)
    texts = [slot.part for slot in fam.text_encoders if not slot.optional]
    folder = fam.denoiser_folder
    for part in (folder, "vae", "scheduler", *texts, *(t.replace("text_encoder", "tokenizer") for t in texts)):
        if not (path / part).is_dir():
            raise CheckpointError(f"{path} is a {cls} folder without {part}/")
    unet = load_unet(path / folder, dtype=dtype)
    vae = load_vae(path / "vae")
    if fam.prompt_encoder == "sd3":
        text_encoder = SD3TextEncoder.from_folder(path, clip_skip or fam.clip_skip,
                                                  t5_width=unet.config.joint_attention_dim)
    elif fam.prompt_encoder == "flux":
        text_encoder = FluxTextEncoder.from_folder(path)
    elif fam.prompt_encoder == "t5":
        text_encoder = T5TextEncoder.from_folder(path, fam.text_length)
    elif fam.prompt_encoder == "refiner":
        text_encoder = RefinerTextEncoder.from_folder(path, clip_skip or fam.clip_skip)
    else:
        encoder = SDXLTextEncoder if fam.prompt_encoder == "dual_clip" else CLIPTextEncoder
        # a diffusers SD 2.x folder holds OpenCLIP already cut at the layer SD 2 reads: its last (clip skip 1)
        text_encoder = encoder.from_folder(path, clip_skip or (fam.clip_skip if len(texts) == 2 else 1))
    arch: Arch = fam.name
    spec = DiffusionSpec(**_pipeline_spec(path, index, arch), text_encoder=text_encoder.identity)
    weights = path / folder / "diffusion_pytorch_model.safetensors"
    return DiffusionModel(unet, vae, spec, path, text_encoder=text_encoder, arch=arch,
                          hash_file=weights if weights.exists() else None)


# --- writing -----------------------------------------------------------------------------------------

def _cast(state: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} unknown; choose fp16, bf16 or fp32")
    return {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}


def _text_models(model: DiffusionModel) -> list:
    te = model.text_encoder
    return [te.model_1, te.model_2] if len(model.family.text_encoders) == 2 else [te.model]


def single_file_state(model: DiffusionModel) -> dict[str, torch.Tensor]:
    """The model in the original single-file layout (what A1111 and ComfyUI load)."""
    unet, vae = plain_state(model.unet), model.vae.state_dict()
    out = {**write_mapped(unet, unet_map(unet, model.unet.config)), **write_mapped(vae, vae_map(vae, model.vae.config))}
    texts = [_canonical(m) for m in _text_models(model)]
    for slot, text in zip(model.family.text_encoders, texts, strict=True):  # each in its own layout
        key_map = clip_map if slot.layout == "clip" else open_clip_map
        out.update(write_mapped(text, key_map(text, slot.single_file_prefix)))
    return out


def _check_writable(model: DiffusionModel) -> None:
    if model.family.network != "unet":
        raise CheckpointError(f"{model.family.label} has no single-file layout that other tools read (its original "
                              "checkpoints hold the transformer alone): write a diffusers folder (convert --to "
                              "diffusers)")


def _single_file_payload(model: DiffusionModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A Stable Diffusion model's tensors in the original single-file layout and the metadata that goes with
    them (imagine's configs, modelspec): what save_single_file and save_gguf write."""
    if model.arch in ("sd3", "flux"):
        return (_sd3_file_state if model.arch == "sd3" else _flux_file_state)(model)
    _check_writable(model)
    text = [json.loads(m.config.to_json_string()) for m in _text_models(model)]
    meta = {"imagine": json.dumps({"unet": _config_of(model.unet), "vae": _config_of(model.vae),
                                   "prediction": model.spec.prediction, "text": text,
                                   "clip_skip": model.text_encoder.clip_skip}),
            "modelspec.architecture": model.family.modelspec,
            "modelspec.prediction_type": {v: k for k, v in PREDICTIONS.items()}[model.spec.prediction],
            "format": "pt"}
    return single_file_state(model), meta


def save_single_file(model: DiffusionModel, out: Path, dtype: str | None = None) -> Path:
    """One .safetensors in the original layout, with imagine's configs and modelspec in its metadata."""
    if model.arch is None or model.text_encoder is None:
        raise CheckpointError("only Stable Diffusion models (SD 1.x, 2.x, SDXL) have a single-file layout; an "
                              "imagine model folder stays a folder")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: a single-file checkpoint is written as .safetensors")
    state, meta = _single_file_payload(model)
    atomic_save_safetensors(_cast(state, dtype), out, meta)
    return out


def save_gguf(model: DiffusionModel, out: Path, quant: str = "Q8_0") -> dict[str, int]:
    """The single-file layout (save_single_file's tensors and keys) in a GGUF file, the denoiser's large
    matrices in ``quant`` (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0; F16 keeps them half precision), everything else in
    F16 (vectors F32); imagine's configs in its metadata. Returns how many tensors went to each type."""
    if model.arch is None or model.text_encoder is None:
        raise CheckpointError("only the Stable Diffusion families (SD 1.x, 2.x, SDXL, SD3, Flux.1) have a "
                              "single-file layout to write as GGUF; an imagine model folder stays a folder")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: a GGUF file is written as .gguf")
    state, meta = _single_file_payload(model)
    denoiser = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    rest = {k: v for k, v in state.items() if k not in denoiser}
    arch = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}.get(model.arch, model.arch)
    return write_gguf(denoiser, out, arch, quant, {k: v for k, v in meta.items() if k != "format"}, rest=rest)


def save_diffusers_pipeline(model: DiffusionModel, out: Path, dtype: str | None = None) -> Path:
    """A diffusers pipeline folder (model_index.json and its parts), written whole or not at all: SD 1.x, 2.x,
    SDXL, SD3, Flux.1 and PixArt, in the layout diffusers' own pipelines load."""
    if model.arch is None or model.text_encoder is None or model.family.diffusers_pipeline is None:
        raise CheckpointError("only the Stable Diffusion families (SD 1.x, 2.x, SDXL, SD3, Flux.1, PixArt) have a "
                              "diffusers pipeline layout; an imagine model folder stays a folder")
    out = Path(out)
    with fresh_folder(out, "convert") as tmp:
        _write_pipeline(model, tmp, dtype)
    return out


def _text_parts(model: DiffusionModel) -> list[tuple[str, str, object, object]]:
    """(encoder folder, tokenizer folder, transformers model, tokenizer) of each text encoder, as the family's
    diffusers pipeline lays them out."""
    te, fam = model.text_encoder, model.family
    if fam.prompt_encoder == "t5":  # PixArt
        return [("text_encoder", "tokenizer", te.t5.model, te.t5.tokenizer)]
    if fam.prompt_encoder == "flux":
        return [("text_encoder", "tokenizer", te.model, te.tokenizer),
                ("text_encoder_2", "tokenizer_2", te.t5.model, te.t5.tokenizer)]
    if fam.prompt_encoder == "clip":
        return [("text_encoder", "tokenizer", te.model, te.tokenizer)]
    parts = [("text_encoder", "tokenizer", te.model_1, te.tokenizer_1),
             ("text_encoder_2", "tokenizer_2", te.model_2, te.tokenizer_2)]
    if fam.prompt_encoder == "sd3" and te.t5 is not None:
        parts.append(("text_encoder_3", "tokenizer_3", te.t5.model, te.t5.tokenizer))
    return parts


def _scheduler_config(spec: DiffusionSpec) -> dict:
    """The scheduler_config.json diffusers' pipelines read: the schedule and prediction (the sampler stays the
    user's choice, so Euler's class stands for any)."""
    if spec.prediction == "flow":
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": spec.num_train_timesteps,
                "shift": spec.flow_shift, "use_dynamic_shifting": spec.flow_dynamic_shift,
                "base_shift": spec.flow_shift_range[0], "max_shift": spec.flow_shift_range[1],
                "base_image_seq_len": spec.flow_token_range[0], "max_image_seq_len": spec.flow_token_range[1]}
    return {"_class_name": "LCMScheduler" if spec.consistency else "EulerDiscreteScheduler",
            "num_train_timesteps": spec.num_train_timesteps,
            "beta_schedule": {v: k for k, v in BETA_SCHEDULES.items()}[spec.schedule],
            "beta_start": spec.beta_start, "beta_end": spec.beta_end,
            "prediction_type": {v: k for k, v in PREDICTIONS.items()}[spec.prediction],
            "rescale_betas_zero_snr": spec.zero_terminal_snr, "timestep_spacing": "trailing", "steps_offset": 0}


def _write_pipeline(model: DiffusionModel, tmp: Path, dtype: str | None) -> None:
    fam, spec = model.family, model.spec
    denoiser = type(model.unet).__name__
    for part, module, cls in ((fam.denoiser_folder, model.unet, denoiser), ("vae", model.vae, "AutoencoderKL")):
        fields = diffusers_config(module) if cls in ("UNet2DConditionModel", "AutoencoderKL") else _config_of(module)
        config = {"_class_name": cls, "_diffusers_version": "0.30.0", **fields}
        atomic_write_bytes(tmp / part / "config.json", json.dumps(config, indent=2).encode())
        atomic_save_safetensors(_cast(module.state_dict(), dtype), tmp / part / "diffusion_pytorch_model.safetensors",
                                {"format": "pt"})
    # diffusers reads a text encoder at its last layer: an encoder read at an earlier one (SD 2's
    # penultimate) is saved without the layers after it, as diffusers' own SD 2 folders are
    drop = model.text_encoder.clip_skip - 1 if fam.prompt_encoder == "clip" else 0
    pipeline = {5: INPAINT_PIPELINES, 4: INSTRUCT_PIPELINES}.get(spec.conditioning_channels, {}).get(
        fam.diffusers_pipeline)
    index = {"_class_name": pipeline or fam.diffusers_pipeline, "_diffusers_version": "0.30.0",
             "_imagine_version": __version__,
             fam.denoiser_folder: ["diffusers", denoiser], "vae": ["diffusers", "AutoencoderKL"]}
    for enc_dir, tok_dir, enc, tok in _text_parts(model):
        keep = enc.dtype
        layers = getattr(enc, "text_model", enc).encoder.layers if drop else None
        if dtype is not None:
            enc.to(DTYPES[dtype])
        if drop:
            getattr(enc, "text_model", enc).encoder.layers = layers[: len(layers) - drop]
            enc.config.num_hidden_layers = len(layers) - drop
        try:
            enc.save_pretrained(tmp / enc_dir, safe_serialization=True)
        finally:
            enc.to(keep)
            if drop:
                getattr(enc, "text_model", enc).encoder.layers = layers
                enc.config.num_hidden_layers = len(layers)
        tok.save_pretrained(tmp / tok_dir)
        index[enc_dir], index[tok_dir] = ["transformers", type(enc).__name__], ["transformers", type(tok).__name__]
    scheduler = _scheduler_config(spec)
    atomic_write_bytes(tmp / "scheduler" / "scheduler_config.json", json.dumps(scheduler, indent=2).encode())
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    if fam.name == "sd3" and "text_encoder_3" not in index:  # SD3 without T5, as diffusers allows
        index.update({"text_encoder_3": [None, None], "tokenizer_3": [None, None]})
    if fam.name == "sdxl":
        index["force_zeros_for_empty_prompt"] = spec.zero_empty_negative
    elif fam.prompt_encoder == "clip":
        index.update({"safety_checker": [None, None], "feature_extractor": [None, None],
                      "requires_safety_checker": False})
    atomic_write_bytes(tmp / "model_index.json", json.dumps(index, indent=2).encode())


# --- the one entry point -----------------------------------------------------------------------------

def load_vae_override(path: Path, like, allow_pickle: bool = False):
    """A separate VAE (A1111's --vae / "SD VAE"): an imagine or diffusers VAE folder, or a single file in
    the original layout with or without ``first_stage_model.``. It keeps ``like``'s latent scaling."""
    path = Path(path)
    if path.is_dir():
        vae = load_vae(path)
    else:
        weights, _ = open_weights(path, allow_pickle)
        if any(k.startswith(VAE) for k in weights):
            weights = _strip(weights, VAE)
        weights = {k: r for k, r in weights.items() if not k.startswith(("loss.", "model_ema."))}
        if "encoder.conv_in.weight" not in weights:
            raise CheckpointError(f"{path} is not a VAE: expected encoder.* and decoder.* keys (original layout)")
        config = vae_config_from_ldm(weights, "sd1", like.config.norm_num_groups)
        with torch.device("meta"):
            keys = list(AutoencoderKL(config).state_dict())
        vae = build_and_fill(lambda: AutoencoderKL(config), read_mapped(weights, vae_map(keys, config, ""), str(path)),
                             str(path)).eval()
    if vae.config.latent_channels != like.config.latent_channels:
        raise CheckpointError(f"{path} is a {vae.config.latent_channels}-channel VAE; this model's latents have "
                              f"{like.config.latent_channels} channels")
    vae.config = replace(vae.config, scaling_factor=like.config.scaling_factor, shift_factor=like.config.shift_factor)
    return vae


def load_any(path: Path | str, *, vae: Path | str | None = None, allow_pickle: bool = False,
             clip_skip: int | None = None, dtype: torch.dtype = torch.float32,
             modules: Sequence[Path | str] = ()) -> DiffusionModel:
    """An imagine model folder, a diffusers pipeline folder or a single-file checkpoint, by what it is.
    ``dtype``: what the UNet holds (bfloat16 halves its memory; run it under bf16 autocast). ``modules``: the
    separate text encoder (and VAE) files of an SD3 or Flux transformer file."""
    path = Path(path)
    kind = kind_of(path)
    if modules and kind != "single-file":
        raise CheckpointError(f"{path} is a model folder: its text encoders are in it; separate text encoder files "
                              "(--text-encoder) are for SD3 and Flux transformer files")
    if kind == "imagine":
        model = load_model_folder(path, dtype=dtype)
    elif kind == "diffusers":
        model = load_diffusers_pipeline(path, clip_skip=clip_skip, dtype=dtype)
    else:
        model = load_single_file(path, allow_pickle=allow_pickle, clip_skip=clip_skip, dtype=dtype,
                                 modules=[Path(m) for m in modules])
    if vae is not None:
        if model.vae is None:
            raise CheckpointError(f"{path} is a pixel-space model: it has no VAE to replace")
        model.vae = load_vae_override(Path(vae), model.vae, allow_pickle)
        model.vae_path = Path(vae)
    return model


def save_like(model: DiffusionModel, base: Path, out: Path, dtype: str | None = None) -> Path:
    """Write a (merged) model: a .safetensors ``out`` is a single file (Stable Diffusion models); otherwise a
    folder of ``base``'s kind (an imagine model folder or a diffusers pipeline)."""
    if Path(out).suffix == ".safetensors":
        return save_single_file(model, out, dtype)
    if kind_of(base) == "imagine":
        return save_model_folder(model, out, dtype)
    return save_diffusers_pipeline(model, out, dtype)


def probe_spec(path: Path | str, allow_pickle: bool = False) -> DiffusionSpec:
    """How a model is sampled (its spec), read without loading any weights: a server lists many models and
    loads only the ones asked for. Missing parts fail here, at start-up, not at the first request."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "imagine":
        spec = DiffusionSpec.from_dict(read_json(path / SPEC_NAME))
        for part in ["unet"] + (["vae"] if spec.latent else []):
            if not (path / part / "model.safetensors").is_file():
                raise CheckpointError(f"{path} has no {part}/model.safetensors: the model folder is incomplete")
        return spec
    if kind == "diffusers":
        index = read_json(path / "model_index.json")
        arch: Arch = _pipeline_family(path, index).name
        return DiffusionSpec(**_pipeline_spec(path, index, arch), text_encoder=ARCH_LABELS[arch])
    weights, metadata = open_weights(path, allow_pickle)
    if sd3_files.transformer_prefix(weights) is not None:
        return DiffusionSpec(**_sd3_file_spec(family("sd3").image_size), text_encoder=ARCH_LABELS["sd3"])
    if flux_files.transformer_prefix(weights) is not None:
        dev = any(k.endswith("guidance_in.in_layer.weight") for k in weights)
        return DiffusionSpec(**_flux_file_spec(dev, family("flux").image_size), text_encoder=ARCH_LABELS["flux"])
    info = inspect_single_file(weights, metadata, str(path))
    return DiffusionSpec(**_single_file_spec(info), text_encoder=ARCH_LABELS[info.arch])


def probe_family(path: Path | str, allow_pickle: bool = False):
    """A model's family (families.Family), read from its configs or keys without loading weights."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "imagine":
        config = path / "unet" / "config.json"
        name = read_json(config).get("_class", "UNet2DConditionModel") if config.exists() else None
        return OWN_BY_NETWORK.get(name, family("imagine"))
    if kind == "diffusers":
        return _pipeline_family(path, read_json(path / "model_index.json"))
    weights, metadata = open_weights(path, allow_pickle)
    if sd3_files.transformer_prefix(weights) is not None:
        return SD3
    if flux_files.transformer_prefix(weights) is not None:
        return FLUX
    return family(inspect_single_file(weights, metadata, str(path)).arch)


def describe_file(path: Path) -> dict:
    """Architecture, size and metadata of a checkpoint without loading its weights (imagine models)."""
    kind = kind_of(path)
    if kind == "single-file":
        weights, metadata = open_weights(path, allow_pickle=False) if path.suffix == ".safetensors" else ({}, {})
        arch = ("sd3" if sd3_files.transformer_prefix(weights) is not None else
                "flux" if flux_files.transformer_prefix(weights) is not None else
                inspect_single_file(weights, metadata, str(path)).arch) if weights else None
        size = path.stat().st_size
    elif kind == "diffusers":
        index = read_json(path / "model_index.json")
        config = path / "text_encoder" / "config.json"
        found = from_diffusers(index.get("_class_name"), read_json(config) if config.exists() else {})
        arch = found.name if found is not None else None
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    else:
        arch, size = "imagine", sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"kind": kind, "arch": arch, "bytes": size}


__all__ = ["ARCH_LABELS", "SingleFile", "clip_tokenizer", "inspect_single_file", "kind_of", "load_any",
           "load_diffusers_pipeline", "load_single_file", "load_vae_override", "save_diffusers_pipeline",
           "save_single_file", "single_file_state", "spec_from_scheduler"]
