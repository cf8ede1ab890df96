"""LoRA files as people have them, read into and written from imagine's ``LoRA`` (STYLE rule 15):

- kohya / A1111: ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``, the module
  path with "_" for "."; text encoders ``lora_te_`` (SD 1.x, 2.x) or ``lora_te1_`` / ``lora_te2_``
  (SDXL). UNet names are diffusers' (``down_blocks_0_attentions_0_...``) or the original layout's
  (``input_blocks_4_1_...``, kohya's SDXL files); both are recognised.
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` and ``.lora_B.weight`` (``transformer.`` for the
  transformer families, ``text_encoder.``, ``text_encoder_2.``), or diffusers' own ``<module>.lora.down.weight``
  / ``.lora.up.weight``; alpha is the rank (written files fold alpha / r into B, so diffusers and imagine
  compute the same update).
- Flux in Black Forest Labs' original names, as kohya (``lora_unet_double_blocks_0_img_attn_qkv``) and ComfyUI
  (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``) write them: a fused layer's LoRA (Q, K
  and V together; a single-stream block's Q, K, V and MLP in ``linear1``) becomes one LoRA per module here,
  each taking its rows of the up matrix, the same update.

Keys are matched against the model's own modules; what matches nothing is kept under its file name so
the loader can list it (a LoRA never silently does nothing)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import nn

from imagine.io.checkpoint import CheckpointError, atomic_save_safetensors, open_weights
from imagine.io.ldm_keys import unet_map
from imagine.nn.lora import LoRA, LoRALayer, WeightDelta, find_module

Format = Literal["kohya", "peft"]
KOHYA_PARTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
               "lora_te2": "text_encoder_2"}


def _modules(part: nn.Module, text: bool) -> dict[str, str]:
    """Underscored name -> module name for every Linear and Conv2d of a part; a text encoder's also with
    ``text_model.`` in front (files keep it; transformers 5's CLIPTextModel has no such level)."""
    out = {}
    for name, module in part.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            out[name.replace(".", "_")] = name
            if text and not name.startswith("text_model."):
                out["text_model_" + name.replace(".", "_")] = name
    return out


def _ldm_names(unet) -> dict[str, str]:
    """Underscored original-layout name -> our module name, for kohya's SDXL files (a UNet's; a transformer's
    names are diffusers' own)."""
    if not hasattr(getattr(unet, "config", None), "layers_per_block"):
        return {}
    try:
        keys = [f"{name}.weight" for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        mapped = unet_map(keys, unet.config, prefix="")
    except CheckpointError:  # self-attention pixel UNets have no original layout
        return {}
    return {src.key.removesuffix(".weight").replace(".", "_"): ours.removesuffix(".weight")
            for ours, src in mapped.items()}


Rows = tuple[str, int, int | None, bool]  # our module, the fused layer's rows it takes, whether halves swap


def _flux_original(unet) -> dict[str, list[Rows]]:
    """BFL's original Flux module names -> our modules and the rows of the fused layer each takes (the final
    adaLN's shift and scale come in the other order)."""
    if type(unet).__name__ != "FluxTransformer2DModel":
        return {}
    cfg = unet.config
    d, mlp = cfg.inner_dim, unet.single_transformer_blocks[0].proj_mlp.out_features if cfg.num_single_layers else 0
    out: dict[str, list[Rows]] = {}

    def one(src: str, dst: str, start: int = 0, end: int | None = None, swap: bool = False) -> None:
        out.setdefault(src, []).append((dst, start, end, swap))

    for i in range(cfg.num_layers):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for k, name in enumerate(("to_q", "to_k", "to_v")):
            one(f"{b}.img_attn.qkv", f"{t}.attn.{name}", k * d, (k + 1) * d)
        for k, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            one(f"{b}.txt_attn.qkv", f"{t}.attn.{name}", k * d, (k + 1) * d)
        for src, dst in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                         ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                         ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                         ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear")):
            one(f"{b}.{src}", f"{t}.{dst}")
    for i in range(cfg.num_single_layers):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for k, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            one(f"{b}.linear1", f"{t}.{name}", k * d, (k + 1) * d)
        one(f"{b}.linear1", f"{t}.proj_mlp", 3 * d, 3 * d + mlp)
        one(f"{b}.linear2", f"{t}.proj_out")
        one(f"{b}.modulation.lin", f"{t}.norm.linear")
    for src, dst in (("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out"),
                     ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                     ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                     ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                     ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                     ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                     ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")):
        one(src, dst)
    one("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return out


def lora_metadata(path: Path | str) -> dict[str, str]:
    """A LoRA file's safetensors metadata (kohya's ss_* fields, imagine's record); {} for other files."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # a broken file is refused when it is loaded
        return {}


# a tensor's name within its module's group -> ours: LoRA's halves (kohya's, PEFT's, diffusers' own), DoRA's
# magnitude, LyCORIS's LoHa, LoKr and full-diff tensors
TENSOR_NAMES = {
    "lora_down.weight": "lora_down", "lora_up.weight": "lora_up", "lora_A.weight": "lora_down",
    "lora_B.weight": "lora_up", "lora.down.weight": "lora_down", "lora.up.weight": "lora_up", "alpha": "alpha",
    "dora_scale": "dora_scale", "lora_magnitude_vector": "dora_scale", "lora_mid.weight": "lora_mid",
    **{name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                               "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                               "diff", "diff_b", "oft_blocks", "oft_diag", "rescale", "ia3_l", "on_input",
                               "boft_R", "boft_s")},
    "oft_R.weight": "oft_R"}
# LyCORIS's (IA)^3 names its scale plain "weight" (with an on_input flag beside it)
LYCORIS_IA3 = {**TENSOR_NAMES, "weight": "ia3_w"}
# ours -> the name LyCORIS writes, where they differ
LYCORIS_NAMES = {"lora_down": "lora_down.weight", "lora_up": "lora_up.weight", "lora_mid": "lora_mid.weight"}
# what other adapter kinds' tensors are called: named in the refusal, never skipped
OTHER_KINDS = {"lora_embedding_A": "an embedding LoRA", "vera_lambda_b": "VeRA"}


def _split(key: str, names: dict[str, str] = TENSOR_NAMES) -> tuple[str, str] | None:
    """(module path, our tensor name) of a key, by the longest tensor name it ends with."""
    for name in sorted(names, key=len, reverse=True):
        if key.endswith("." + name):
            return key[: -len(name) - 1], names[name]
    return None


def _split_fused_update(path: Path, unet: nn.Module, name: str, rows: list[Rows], tensors: dict, alpha,
                        metadata: dict, peft: dict) -> dict[str, WeightDelta]:
    """A LyCORIS, DoRA, OFT or IA3 update of one of Flux's original (fused) layers as each of our modules' share:
    the fused weight rebuilt from the modules (Q, K, V and the MLP input side by side; the final adaLN's halves
    back in BFL's order), its update computed as the kind defines it, and each module given its rows as a full
    diff (the same update, exactly)."""
    targets = [(find_module(unet, target), start, end, swap) for target, start, end, swap in rows]
    if any(module is None for module, *_ in targets):
        raise CheckpointError(f"{path}: unet.{name} maps to modules this Flux lacks")

    def swapped(t: torch.Tensor, swap: bool) -> torch.Tensor:
        return torch.cat(t.chunk(2)[::-1]) if swap else t

    order = sorted(range(len(targets)), key=lambda i: targets[i][1])
    weight = torch.cat([swapped(targets[i][0].weight.detach().float(), targets[i][3]) for i in order])
    biases = [targets[i][0].bias for i in order]
    bias = torch.cat([swapped(b.detach().float(), targets[i][3]) for i, b in zip(order, biases, strict=True)]) \
        if all(b is not None for b in biases) else None
    fused = _FusedLayer(weight, bias)
    update = _weight_update(path, "unet", name, dict(tensors), alpha, fused, metadata, peft)
    why = update.expected(fused)
    if why is not None:
        raise CheckpointError(f"{path}: unet.{name} does not fit Flux's fused layer: {why}")
    delta, delta_b = update.delta_weight(weight), update.delta_bias(fused)
    out = {}
    for (module, start, end, swap), (target, *_) in zip(targets, rows, strict=True):
        stop = end if end is not None else weight.shape[0]
        piece = {"diff": swapped(delta[start:stop], swap).reshape(module.weight.shape)}
        if delta_b is not None and module.bias is not None:
            piece["diff_b"] = swapped(delta_b[start:stop], swap)
        out[f"unet.{target}"] = WeightDelta("full", piece)
    return out


class _FusedLayer(nn.Module):
    """A stand-in for one of Flux's original fused layers: its weight and bias, rebuilt from our modules."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight, requires_grad=False), bias


def is_adapter_file(path: Path | str) -> bool:
    """Whether a file holds an adapter (LoRA, LyCORIS, DoRA, OFT, IA3) rather than a model: a .safetensors whose
    keys are adapter tensors (read from its header alone)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # a broken file is refused when it is loaded
        return False
    return bool(keys) and all(_split(k, LYCORIS_IA3) is not None for k in keys) and \
        any(_split(k) is not None and _split(k)[1] != "alpha" for k in keys) and \
        not any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys)


def _matches(name: str, patterns) -> bool:
    """Whether a module name is among PEFT's target-style patterns (a list of name suffixes, or a regex)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns or ())


def _weight_update(path: Path, part: str, name: str, tensors: dict[str, torch.Tensor], alpha: float | None,
                   module: nn.Module | None, metadata: dict[str, str], peft: dict) -> WeightDelta:
    """A LyCORIS, DoRA, OFT or IA3 update of one module, its kind told by its tensors."""
    where = f"{path}: {part}.{name}"
    if "oft_blocks" in tensors or "oft_diag" in tensors:
        blocks = tensors.pop("oft_blocks", None)
        given = blocks is None
        blocks = tensors.pop("oft_diag") if given else blocks
        if blocks.ndim == 4 and given:  # LyCORIS's butterfly OFT: a level of rotations per butterfly factor
            return WeightDelta("boft", {"oft_blocks": blocks, **tensors}, None)
        if blocks.ndim != 3:
            raise CheckpointError(f"{where} holds a {blocks.ndim}-d OFT tensor; imagine reads 3-d OFT blocks and "
                                  "LyCORIS's 4-d butterfly oft_diag")
        constraint = None
        if not given and alpha:  # kohya's networks.oft bounds Q's norm by alpha x out; LyCORIS's by alpha
            kohya = metadata.get("ss_network_module", "") == "networks.oft"
            constraint = float(alpha) * (blocks.shape[0] * blocks.shape[1] if kohya else 1)
        return WeightDelta("oft", {"oft_blocks": blocks, **tensors}, None,
                           options={"constraint": constraint, "given": given})
    if "boft_R" in tensors:
        if "boft_s" not in tensors:
            raise CheckpointError(f"{where} holds boft_R without boft_s: not a whole PEFT BOFT layer")
        return WeightDelta("peft_boft", tensors, None)
    if "oft_R" in tensors:
        if peft.get("coft"):
            raise CheckpointError(f"{where}: a constrained PEFT OFT (coft), which imagine does not apply yet")
        n_el = tensors["oft_R"].shape[1]
        size = round((1 + (1 + 8 * n_el) ** 0.5) / 2)
        neumann = peft.get("num_cayley_neumann_terms", 5) if peft.get("use_cayley_neumann", True) else 0
        return WeightDelta("peft_oft", tensors, None, options={"block_size": size, "neumann": neumann})
    if "ia3_l" in tensors or "ia3_w" in tensors:
        if "ia3_l" in tensors:  # PEFT's: the scale itself
            scale = tensors["ia3_l"]
            if "feedforward_modules" in peft:
                feedforward = _matches(name, peft["feedforward_modules"])
            elif module is None:
                feedforward = False
            elif scale.ndim == 2:  # a linear layer's: (out, 1) scales rows, (1, in) the input
                feedforward = scale.shape[0] == 1 and module.weight.shape[1] != 1
            elif module.weight.shape[0] != module.weight.shape[1]:  # a convolution's (1, C, 1, 1)
                feedforward = scale.shape[1] == module.weight.shape[1]
            else:
                raise CheckpointError(f"{where}: an IA3 scale on a square convolution, which scales its input or "
                                      "its output as PEFT's config says: put adapter_config.json beside it")
            return WeightDelta("ia3", {"ia3_l": scale}, None, options={"feedforward": bool(feedforward), "bias": True})
        on_input = bool(tensors["on_input"].flatten()[0]) if "on_input" in tensors else False
        # LyCORIS's (IA)^3 learns the change itself: dW = W w
        return WeightDelta("ia3", {"ia3_l": tensors["ia3_w"] + 1}, None, options={"feedforward": on_input})
    algo = ("loha" if "hada_w1_a" in tensors else "lokr" if any(k.startswith("lokr_") for k in tensors)
            else "full" if "diff" in tensors else "dora" if "dora_scale" in tensors else "tucker")
    return WeightDelta(algo, tensors, alpha)


def load_lora(path: Path | str, parts: dict[str, nn.Module], *, allow_pickle: bool = False):
    """A LoRA-family file as imagine's LoRA, its keys resolved against ``parts``' modules: plain LoRA (kohya's,
    PEFT's and diffusers' layouts), LyCORIS's LoCon, LoHa, LoKr and full diffs, and DoRA (LyCORIS's dora_scale,
    PEFT's magnitude vector). Other adapter kinds (OFT, IA3, ...) are refused by name."""
    path = Path(path)
    weights, metadata = open_weights(path, allow_pickle)
    lora = LoRA(name=path.stem)
    for key in weights:
        for marker, kind in OTHER_KINDS.items():
            if key.endswith(marker):
                raise CheckpointError(f"{path} holds {marker} tensors ({key}): it is {kind}, which imagine does not "
                                      "apply yet (it reads LoRA, LoCon, LoHa, LoKr, full diffs, DoRA, OFT and IA3)")
    names = LYCORIS_IA3 if any(k.endswith(".on_input") for k in weights) else TENSOR_NAMES
    split = {key: _split(key, names) for key in weights}
    known = [k for k, v in split.items() if v is not None]
    if not known:
        sample = ", ".join(list(weights)[:4]) or "no tensors"
        raise CheckpointError(f"{path} is not a LoRA: expected kohya's *.lora_down.weight / *.lora_up.weight, "
                              f"PEFT's *.lora_A.weight / *.lora_B.weight or LyCORIS's hada_* / lokr_* / diff "
                              f"keys; found {sample}")
    strays = [k for k, v in split.items() if v is None]
    if strays:
        raise CheckpointError(f"{path}: {len(strays)} keys are no LoRA, LyCORIS or DoRA tensor imagine knows: "
                              f"{', '.join(strays[:8])}")
    kohya = any(base.startswith(tuple(p + "_" for p in KOHYA_PARTS)) for base, _ in split.values())
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    tables = {name: _modules(part, name != "unet") for name, part in parts.items()}
    fused = _flux_original(parts["unet"]) if "unet" in parts else {}
    if "unet" in parts:
        tables["unet"] = {**_ldm_names(parts["unet"]), **{k.replace(".", "_"): k for k in fused},
                          **tables["unet"]}
    alphas = json.loads(metadata.get("lora_alphas", "{}")) if metadata else {}
    # PEFT's save_pretrained keeps alpha and r beside the weights (adapter_config.json), not in them
    peft_config = path.with_name("adapter_config.json")
    peft_scale, config = None, {}
    if not kohya and peft_config.is_file():
        config = json.loads(peft_config.read_text())
        r, alpha = config.get("r"), config.get("lora_alpha", config.get("alpha"))
        if r and alpha is not None:
            peft_scale = (float(alpha), int(r))
    for key, ref in weights.items():
        base, what = split[key]
        if kohya:
            prefix = next((p for p in sorted(KOHYA_PARTS, key=len, reverse=True) if base.startswith(p + "_")), None)
            if prefix is None:
                raise CheckpointError(f"{path}: key {key} has no lora_unet_ / lora_te_ / lora_te1_ / lora_te2_ prefix")
            part, name = KOHYA_PARTS[prefix], base[len(prefix) + 1:]
            name = tables.get(part, {}).get(name, name)
        else:
            base = base.removeprefix("base_model.model.")  # PEFT's own saves
            part, _, name = base.partition(".")
            if part in ("transformer", "diffusion_model"):  # diffusers' transformer families; ComfyUI's Flux
                part = "unet"
            elif part not in parts and part not in ("unet", "text_encoder", "text_encoder_2"):
                part, name = "unet", base  # files that leave the part out are UNet LoRAs
        groups.setdefault((part, name), {})[what] = ref.read()
    for (part, name), tensors in groups.items():
        alpha = tensors.pop("alpha", None)
        alpha = float(alpha) if alpha is not None else alphas.get(f"{part}.{name}")
        if alpha is None and peft_scale is not None:  # alpha / r as PEFT's config says, at this module's rank
            rank = next((tensors[k].shape[0] for k in ("lora_down", "hada_w1_b", "lokr_w1_b", "lokr_w2_b")
                         if k in tensors), peft_scale[1])
            alpha = peft_scale[0] * rank / peft_scale[1]
        plain = set(tensors) <= {"lora_down", "lora_up"}
        algo = "lora" if plain else "other"
        if algo == "lora":
            down, up = tensors.get("lora_down"), tensors.get("lora_up")
            if down is None or up is None:
                raise CheckpointError(f"{path}: {part}.{name} has {sorted(tensors)}, not both halves of a LoRA")
        if part == "unet" and name in fused and algo != "lora":  # a LyCORIS kind on an original Flux layer
            lora.layers.update(_split_fused_update(path, parts[part], name, fused[name], tensors, alpha, metadata or {},
                                                   config))
            continue
        if part == "unet" and name in fused:  # one fused original layer: a LoRA per module, on its rows
            for target, start, end, swap in fused[name]:
                rows = up.float()[start:end]
                if swap:
                    rows = torch.cat(rows.chunk(2)[::-1])
                module = find_module(parts[part], target)
                lora.layers[f"{part}.{target}"] = LoRALayer.from_tensors(down.float(), rows.contiguous(), alpha,
                                                                         module)
            continue
        if algo == "lora":
            module = find_module(parts[part], name) if part in parts else None
            lora.layers[f"{part}.{name}"] = LoRALayer.from_tensors(down.float(), up.float(), alpha, module)
        else:
            module = find_module(parts[part], name) if part in parts else None
            lora.layers[f"{part}.{name}"] = _weight_update(path, part, name, tensors, alpha, module, metadata or {},
                                                           config)
    return lora


def save_lora(lora, path: Path | str, fmt: Format = "kohya", *, ldm_names_for=None, metadata: dict | None = None):
    """Write ``lora`` as kohya's layout (A1111, ComfyUI) or PEFT's (diffusers' load_lora_weights).
    ``ldm_names_for``: a UNet whose original-layout names the kohya file should use (kohya's SDXL files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are written as .safetensors")
    ldm = {v: k for k, v in _ldm_names(ldm_names_for).items()} if ldm_names_for is not None else {}
    kohya_prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if "text_encoder_2" in lora.parts() else "lora_te",
                    "text_encoder_2": "lora_te2"}
    out, alphas = {}, {}
    kinds = sorted({layer.algo for layer in lora.layers.values() if isinstance(layer, WeightDelta)})
    if kinds and fmt != "kohya":
        raise ValueError(f"{lora.name} holds {', '.join(kinds)} updates, which are written in LyCORIS's layout (kohya "
                         "names: A1111, ComfyUI and Forge read it), not PEFT's")
    for key, layer in lora.layers.items():
        part, _, name = key.partition(".")
        if fmt == "kohya":
            if part != "unet" and not name.startswith("text_model."):
                name = "text_model." + name
            flat = ldm.get(name, name.replace(".", "_")) if part == "unet" else name.replace(".", "_")
            base = f"{kohya_prefix[part]}_{flat}"
            if isinstance(layer, WeightDelta):  # LyCORIS's tensor names; DoRA's halves as LoRA's
                for tensor_name, value in layer.tensors().items():
                    out[f"{base}.{LYCORIS_NAMES.get(tensor_name, tensor_name)}"] = value.contiguous()
            else:
                out[f"{base}.lora_down.weight"] = layer.down.weight.detach().contiguous()
                out[f"{base}.lora_up.weight"] = layer.up.weight.detach().contiguous()
            out[f"{base}.alpha"] = torch.tensor(layer.alpha)
            continue
        down, up = layer.down.weight.detach().contiguous(), layer.up.weight.detach().contiguous()
        if fmt == "peft":
            # PEFT files carry no alpha diffusers reads back, so the scale goes into B: (alpha / r) B A
            # is the same update as (1) ((alpha / r) B) A, which a reader taking alpha = r computes
            out[f"{part}.{name}.lora_A.weight"] = down
            out[f"{part}.{name}.lora_B.weight"] = (up * layer.scale).contiguous()
        else:
            raise ValueError(f"LoRA format {fmt!r} unknown; choose kohya or peft")
    meta = {"format": "pt", **(metadata or {})}
    if kinds:  # as LyCORIS marks its files (kohya's trainer metadata), so tools tell the kind without the keys
        meta.setdefault("ss_network_module", "lycoris.kohya")
        meta.setdefault("ss_network_args", json.dumps({"algo": kinds[0]}))
    if alphas:
        meta["lora_alphas"] = json.dumps(alphas)
    atomic_save_safetensors(out, path, meta)
    return path
