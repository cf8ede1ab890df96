"""Key maps between imagine's (diffusers') state-dict keys and the original Stable Diffusion layout that
single-file checkpoints use (CompVis/Stability ``ldm`` and ``sgm``: ``input_blocks``, ``encoder.down``,
OpenCLIP's ``resblocks``), in both directions (STYLE rule 15). A map is built from a model's config and
its own keys, so it covers exactly the tensors that model has: nothing is guessed.

Each of our keys comes from one ``Src``: a key of the foreign file, optionally one of ``count`` equal
slices along dim 0 (OpenCLIP packs q, k, v in one in_proj), transposed (OpenCLIP's text_projection is
stored (D, P)) or a 1x1 convolution standing for a linear layer (the VAE's attention)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from imagine.io.checkpoint import CheckpointError, Ref, Weights, aligned
from imagine.nn.compact import Packed


@dataclass(frozen=True)
class Src:
    key: str
    part: int | None = None  # which slice of ``count`` along dim 0
    count: int = 1
    transpose: bool = False
    conv1x1: bool = False  # stored (C, C, 1, 1), ours (C, C)
    swap: bool = False  # its two halves (along dim 0) in the other order: an adaLN's (shift, scale) vs (scale, shift)
    rows: tuple[int, int] | None = None  # rows start:end of a fused tensor whose pieces differ in size (Flux's linear1)


KeyMap = dict[str, Src]  # our key -> where it lives in the foreign layout


def _ours(t: torch.Tensor | Packed, src: Src) -> torch.Tensor | Packed:
    if isinstance(t, Packed):  # a compact weight (GGUF): its rows cut and swapped as stored, never expanded
        if src.transpose or src.conv1x1:
            t = t.dequantize(torch.float32)
        else:
            if src.part is not None:
                t = t.chunk(src.count, src.part)
            if src.rows is not None:
                t = t.rows(*src.rows)
            if src.swap:
                t = t.swap()
            return t.contiguous()
    if src.part is not None:
        t = t.chunk(src.count, dim=0)[src.part]
    if src.rows is not None:
        t = t[src.rows[0]: src.rows[1]]
    if src.transpose:
        t = t.T
    if src.conv1x1:
        t = t.reshape(t.shape[:2])
    if src.swap:
        t = torch.cat(t.chunk(2, dim=0)[::-1])
    return t.contiguous()


def _our_shape(shape: tuple[int, ...], src: Src) -> tuple[int, ...]:
    if src.part is not None:
        shape = (shape[0] // src.count, *shape[1:])
    if src.rows is not None:
        shape = (src.rows[1] - src.rows[0], *shape[1:])
    if src.transpose:
        shape = tuple(reversed(shape))
    if src.conv1x1:
        shape = shape[:2]
    return tuple(shape)


def read_mapped(foreign: Weights, key_map: KeyMap, source: str) -> Weights:
    """Our keys, each read from the foreign file when asked. Missing foreign keys fail here, listed."""
    missing = sorted({src.key for src in key_map.values() if src.key not in foreign})
    if missing:
        more = f" (and {len(missing) - 15} more)" if len(missing) > 15 else ""
        raise CheckpointError(f"{source} lacks {len(missing)} tensors this architecture needs: "
                              f"{', '.join(missing[:15])}{more}")
    return {ours: Ref(_our_shape(foreign[src.key].shape, src),
                      lambda src=src: aligned(_ours(foreign[src.key].raw(), src)))
            for ours, src in key_map.items()}


def write_mapped(state: Mapping[str, torch.Tensor], key_map: KeyMap) -> dict[str, torch.Tensor]:
    """Our tensors in the foreign layout: slices concatenated in order, transposes and 1x1 convs undone."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for ours, src in key_map.items():
        t = state[ours]
        if src.swap:
            t = torch.cat(t.chunk(2, dim=0)[::-1])
        if src.conv1x1:
            t = t[:, :, None, None]
        if src.transpose:
            t = t.T
        if src.part is not None or src.rows is not None:
            parts.setdefault(src.key, {})[src.part if src.part is not None else src.rows[0]] = t
        else:
            out[src.key] = t.contiguous()
    for key, pieces in parts.items():  # in order of their part, or of their first row
        out[key] = torch.cat([pieces[i] for i in sorted(pieces)], dim=0)
    return out


# --- UNet --------------------------------------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def unet_map(keys: Iterable[str], config, prefix: str = "model.diffusion_model.") -> KeyMap:
    """diffusers UNet2DConditionModel keys -> ldm's openaimodel.UNetModel keys. Down level i's resnet j is
    input_blocks[1 + i(L+1) + j] (attention at .1), its downsampler input_blocks[(i+1)(L+1)].0.op; up
    level i's resnet j is output_blocks[i(L+1) + j], its upsampler the last one's .1 or .2 (after attention)."""
    n = config.layers_per_block + 1
    if any(t.startswith("Attn") for t in (*config.down_block_types, *config.up_block_types)):
        raise CheckpointError("this UNet has self-attention blocks (AttnDownBlock2D), which the original Stable "
                              "Diffusion layout cannot hold; keep it as an imagine or diffusers folder")
    out: KeyMap = {}
    for key in keys:
        p = key.split(".")
        rest = ".".join(p[4:])
        if p[0] == "time_embedding":
            ldm = f"time_embed.{ {'linear_1': 0, 'linear_2': 2}[p[1]] }.{p[2]}"
        elif p[0] == "add_embedding":
            ldm = f"label_emb.0.{ {'linear_1': 0, 'linear_2': 2}[p[1]] }.{p[2]}"
        elif p[0] == "class_embedding":
            ldm = f"label_emb.{p[1]}"
        elif p[0] == "conv_in":
            ldm = f"input_blocks.0.0.{p[1]}"
        elif p[0] == "conv_norm_out":
            ldm = f"out.0.{p[1]}"
        elif p[0] == "conv_out":
            ldm = f"out.2.{p[1]}"
        elif p[0] == "down_blocks":
            i, j = int(p[1]), int(p[3])
            if p[2] == "resnets":
                ldm = f"input_blocks.{1 + i * n + j}.0.{_resnet(rest)}"
            elif p[2] == "attentions":
                ldm = f"input_blocks.{1 + i * n + j}.1.{rest}"
            else:  # downsamplers.0.conv.weight
                ldm = f"input_blocks.{(i + 1) * n}.0.op.{p[5]}"
        elif p[0] == "mid_block":
            j = int(p[2])
            inner = ".".join(p[3:])
            ldm = f"middle_block.{2 * j}.{_resnet(inner)}" if p[1] == "resnets" else f"middle_block.1.{inner}"
        elif p[0] == "up_blocks":
            i, j = int(p[1]), int(p[3])
            if p[2] == "resnets":
                ldm = f"output_blocks.{i * n + j}.0.{_resnet(rest)}"
            elif p[2] == "attentions":
                ldm = f"output_blocks.{i * n + j}.1.{rest}"
            else:  # upsamplers.0.conv.weight
                slot = 2 if config.up_block_types[i].startswith("CrossAttn") else 1
                ldm = f"output_blocks.{i * n + n - 1}.{slot}.conv.{p[5]}"
        else:
            raise CheckpointError(f"no original-layout name for UNet key {key}")
        out[key] = Src(prefix + ldm)
    return out


# --- VAE ---------------------------------------------------------------------------------------------

_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_map(keys: Iterable[str], config, prefix: str = "first_stage_model.") -> KeyMap:
    """diffusers AutoencoderKL keys -> ldm's AutoencoderKL keys. The decoder's up levels are numbered by
    resolution in ldm (up.0 is the last to run), the reverse of diffusers' up_blocks; attention is 1x1 convs."""
    levels = len(config.block_out_channels)
    out: KeyMap = {}
    for key in keys:
        p = key.split(".")
        conv1x1 = False
        if p[0] in ("quant_conv", "post_quant_conv"):
            ldm = key
        elif p[1] in ("conv_in", "conv_out"):
            ldm = key
        elif p[1] == "conv_norm_out":
            ldm = f"{p[0]}.norm_out.{p[2]}"
        elif p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2])
            level, kind = (f"down.{i}", "downsample") if p[1] == "down_blocks" else (f"up.{levels - 1 - i}", "upsample")
            if p[3] == "resnets":
                tail = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                ldm = f"{p[0]}.{level}.block.{p[4]}.{tail}"
            else:  # downsamplers.0.conv.weight
                ldm = f"{p[0]}.{level}.{kind}.conv.{p[6]}"
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                tail = ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
                ldm = f"{p[0]}.mid.block_{int(p[3]) + 1}.{tail}"
            else:
                name = ".".join(p[4:-1])
                ldm = f"{p[0]}.mid.attn_1.{_VAE_ATTENTION[name]}.{p[-1]}"
                conv1x1 = name != "group_norm" and p[-1] == "weight"
        else:
            raise CheckpointError(f"no original-layout name for VAE key {key}")
        out[key] = Src(prefix + ldm, conv1x1=conv1x1)
    return out


# --- text encoders -----------------------------------------------------------------------------------

def clip_map(keys: Iterable[str], prefix: str) -> KeyMap:
    """transformers CLIPTextModel keys -> the same names under ``prefix`` (SD 1.x's and SDXL's first
    encoder are stored as transformers modules: ``cond_stage_model.transformer.text_model.*``). Our keys
    may or may not start with ``text_model.`` (transformers 5 drops it on CLIPTextModel)."""
    return {key: Src(prefix + "text_model." + key.removeprefix("text_model.")) for key in keys
            if not key.endswith("position_ids")}


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def open_clip_map(keys: Iterable[str], prefix: str) -> KeyMap:
    """transformers CLIPTextModel(WithProjection) keys -> OpenCLIP's text tower (SD 2.x's ViT-H and SDXL's
    ViT-bigG: ``resblocks``, one packed in_proj for q, k, v, text_projection stored transposed)."""
    out: KeyMap = {}
    for key in keys:
        k = key.removeprefix("text_model.")
        if k.endswith("position_ids"):
            continue
        if k == "embeddings.token_embedding.weight":
            src = Src(prefix + "token_embedding.weight")
        elif k == "embeddings.position_embedding.weight":
            src = Src(prefix + "positional_embedding")
        elif k.startswith("final_layer_norm."):
            src = Src(prefix + "ln_final." + k.rpartition(".")[2])
        elif k == "text_projection.weight":
            src = Src(prefix + "text_projection", transpose=True)
        elif k.startswith("encoder.layers."):
            _, _, i, rest = k.split(".", 3)
            module, _, param = rest.rpartition(".")
            block = f"{prefix}transformer.resblocks.{i}."
            if module.startswith("self_attn.") and module[10:] in _QKV:
                src = Src(f"{block}attn.in_proj_{param}", part=_QKV[module[10:]], count=3)
            elif module in _OPENCLIP_LAYER:
                src = Src(f"{block}{_OPENCLIP_LAYER[module]}.{param}")
            else:
                raise CheckpointError(f"no OpenCLIP name for text encoder key {key}")
        else:
            raise CheckpointError(f"no OpenCLIP name for text encoder key {key}")
        out[key] = src
    return out
