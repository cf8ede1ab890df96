"""Flux.1 single files in Black Forest Labs' original layout (STYLE rule 15: formats live at the edge), as
``flux1-dev.safetensors`` / ``flux1-schnell.safetensors`` and ComfyUI's and Forge's copies have them: the
transformer's ``double_blocks.N.{img,txt}_{attn,mlp,mod}``, ``single_blocks.N.{linear1, linear2, modulation}``
(Q, K, V fused; a single block's Q, K, V and MLP input fused in ``linear1``), ``img_in``, ``txt_in``,
``time_in``, ``vector_in``, ``guidance_in`` ([dev]) and ``final_layer`` (its adaLN's shift and scale in the other
order), with no prefix, ``model.diffusion_model.`` or ``diffusion_model.``. The config is read from the shapes;
the key map works both ways (diffusers' own converter is the test's oracle)."""

from __future__ import annotations

from imagine.io.checkpoint import Weights
from imagine.io.ldm_keys import KeyMap, Src
from imagine.models.flux import FluxConfig, rope_axes

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
MARKER = "double_blocks.0.img_attn.qkv.weight"
# all-in-one files (ComfyUI's checkpoint saves): the text encoders and the VAE beside the transformer
CLIP_L, T5, VAE = "text_encoders.clip_l.transformer.", "text_encoders.t5xxl.transformer.", "vae."


def transformer_prefix(keys) -> str | None:
    """Where a Flux file keeps its transformer (None: it holds none)."""
    keys = set(keys)
    return next((p for p in PREFIXES if p + MARKER in keys), None)


def variant(keys, prefix: str) -> str | None:
    """A Flux variant imagine does not run, by the keys that mark it (None: the text-to-image model)."""
    keys = set(keys)
    if prefix + "img_in.weight" in keys:
        return None
    return "unknown"


def config_from_original(w: Weights) -> FluxConfig:
    """The transformer's config from the shapes of its tensors (keys without the prefix)."""
    inner, in_channels = w["img_in.weight"].shape
    head_dim = w["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    doubles = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("double_blocks."))
    singles = 1 + max((int(k.split(".")[1]) for k in w if k.startswith("single_blocks.")), default=-1)
    return FluxConfig(in_channels=in_channels, num_layers=doubles, num_single_layers=singles,
                      attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
                      joint_attention_dim=w["txt_in.weight"].shape[1],
                      pooled_projection_dim=w["vector_in.in_layer.weight"].shape[1],
                      guidance_embeds="guidance_in.in_layer.weight" in w, axes_dims_rope=rope_axes(head_dim),
                      out_channels=None if w["final_layer.linear.weight"].shape[0] == in_channels
                      else w["final_layer.linear.weight"].shape[0])


def transformer_map(cfg: FluxConfig, prefix: str = "") -> KeyMap:
    """Our (diffusers') Flux keys -> BFL's original keys."""
    out: KeyMap = {}
    d = cfg.inner_dim
    mlp = 4 * d  # Flux's MLP ratio

    def both(ours: str, theirs: str, **kw) -> None:
        for what in ("weight", "bias"):
            out[f"{ours}.{what}"] = Src(f"{prefix}{theirs}.{what}", **kw)

    def scale(ours: str, theirs: str) -> None:  # an RMS norm's weight is BFL's "scale"
        out[f"{ours}.weight"] = Src(f"{prefix}{theirs}.scale")

    for ours, theirs in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in")) + (
            (("guidance_embedder", "guidance_in"),) if cfg.guidance_embeds else ()):
        both(f"time_text_embed.{ours}.linear_1", f"{theirs}.in_layer")
        both(f"time_text_embed.{ours}.linear_2", f"{theirs}.out_layer")
    both("context_embedder", "txt_in")
    both("x_embedder", "img_in")
    for i in range(cfg.num_layers):
        t, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        both(f"{t}.norm1.linear", f"{b}.img_mod.lin")
        both(f"{t}.norm1_context.linear", f"{b}.txt_mod.lin")
        for k, name in enumerate(("to_q", "to_k", "to_v")):
            both(f"{t}.attn.{name}", f"{b}.img_attn.qkv", part=k, count=3)
        for k, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            both(f"{t}.attn.{name}", f"{b}.txt_attn.qkv", part=k, count=3)
        scale(f"{t}.attn.norm_q", f"{b}.img_attn.norm.query_norm")
        scale(f"{t}.attn.norm_k", f"{b}.img_attn.norm.key_norm")
        scale(f"{t}.attn.norm_added_q", f"{b}.txt_attn.norm.query_norm")
        scale(f"{t}.attn.norm_added_k", f"{b}.txt_attn.norm.key_norm")
        both(f"{t}.attn.to_out.0", f"{b}.img_attn.proj")
        both(f"{t}.attn.to_add_out", f"{b}.txt_attn.proj")
        both(f"{t}.ff.net.0.proj", f"{b}.img_mlp.0")
        both(f"{t}.ff.net.2", f"{b}.img_mlp.2")
        both(f"{t}.ff_context.net.0.proj", f"{b}.txt_mlp.0")
        both(f"{t}.ff_context.net.2", f"{b}.txt_mlp.2")
    for i in range(cfg.num_single_layers):
        t, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        both(f"{t}.norm.linear", f"{b}.modulation.lin")
        for k, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            both(f"{t}.{name}", f"{b}.linear1", rows=(k * d, (k + 1) * d))
        both(f"{t}.proj_mlp", f"{b}.linear1", rows=(3 * d, 3 * d + mlp))
        scale(f"{t}.attn.norm_q", f"{b}.norm.query_norm")
        scale(f"{t}.attn.norm_k", f"{b}.norm.key_norm")
        both(f"{t}.proj_out", f"{b}.linear2")
    both("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    both("proj_out", "final_layer.linear")
    return out
