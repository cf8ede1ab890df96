"""Stable Diffusion 3 / 3.5 single files in Stability's original layout (STYLE rule 15: formats live at the edge):
the MMDiT under ``model.diffusion_model.`` (``joint_blocks.N.{x_block, context_block}`` with fused Q/K/V,
``attn2`` in SD3.5 Medium's dual-attention blocks, ``ln_q``/``ln_k`` where queries and keys are normed, the
final adaLN's shift and scale in the other order), the 16-channel VAE under ``first_stage_model.`` (ldm's
layout, no quant convs) and, in the all-in-one files, the text encoders under ``text_encoders.clip_l``,
``.clip_g`` and ``.t5xxl`` ``.transformer.`` in transformers' own layout. The architecture is read from the
keys and shapes; the key map works both ways (diffusers' own converter is the test's oracle)."""

from __future__ import annotations

from pathlib import Path

import torch

from imagine.io.checkpoint import CheckpointError, Weights, build_and_fill
from imagine.io.ldm_keys import KeyMap, Src
from imagine.models.mmdit import MMDiTConfig

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
MARKER = "joint_blocks.0.x_block.attn.qkv.weight"
CLIP_L, CLIP_G, T5 = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
                      "text_encoders.t5xxl.transformer.")


def transformer_prefix(keys) -> str | None:
    """Where an SD3 file keeps its MMDiT (None: the file holds none)."""
    keys = set(keys)
    return next((p for p in PREFIXES if p + MARKER in keys), None)


def config_from_original(w: Weights) -> MMDiTConfig:
    """The MMDiT's config from the shapes of its tensors (keys without the prefix)."""
    proj = w["x_embedder.proj.weight"].shape  # (inner, in_channels, p, p)
    inner, patch = proj[0], proj[-1]
    layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("joint_blocks."))
    dual = tuple(sorted({int(k.split(".")[1]) for k in w if ".x_block.attn2." in k}))
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in w
    head_dim = w["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0] if qk_norm else 64  # SD3's heads are 64 wide
    positions = w["pos_embed"].shape[1]
    return MMDiTConfig(sample_size=128, patch_size=patch, in_channels=proj[1], num_layers=layers,
                       attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
                       joint_attention_dim=w["context_embedder.weight"].shape[1],
                       caption_projection_dim=w["context_embedder.weight"].shape[0],
                       pooled_projection_dim=w["y_embedder.mlp.0.weight"].shape[1],
                       out_channels=w["final_layer.linear.weight"].shape[0] // patch**2,
                       pos_embed_max_size=round(positions**0.5), qk_norm="rms_norm" if qk_norm else None,
                       dual_attention_layers=dual)


def transformer_map(cfg: MMDiTConfig, prefix: str = "model.diffusion_model.") -> KeyMap:
    """Our (diffusers') MMDiT keys -> Stability's original keys."""
    out: KeyMap = {}

    def both(ours: str, theirs: str, **kw) -> None:
        for what in ("weight", "bias"):
            out[f"{ours}.{what}"] = Src(f"{prefix}{theirs}.{what}", **kw)

    out["pos_embed.pos_embed"] = Src(prefix + "pos_embed")
    both("pos_embed.proj", "x_embedder.proj")
    both("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    both("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    both("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    both("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    both("context_embedder", "context_embedder")
    for i in range(cfg.num_layers):
        t, b = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == cfg.num_layers - 1
        for k, name in enumerate(("to_q", "to_k", "to_v")):
            both(f"{t}.attn.{name}", f"{b}.x_block.attn.qkv", part=k, count=3)
        for k, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            both(f"{t}.attn.{name}", f"{b}.context_block.attn.qkv", part=k, count=3)
        both(f"{t}.attn.to_out.0", f"{b}.x_block.attn.proj")
        if not last:
            both(f"{t}.attn.to_add_out", f"{b}.context_block.attn.proj")
        if cfg.qk_norm:
            for ours, theirs in (("norm_q", "x_block.attn.ln_q"), ("norm_k", "x_block.attn.ln_k"),
                                 ("norm_added_q", "context_block.attn.ln_q"),
                                 ("norm_added_k", "context_block.attn.ln_k")):
                out[f"{t}.attn.{ours}.weight"] = Src(f"{prefix}{b}.{theirs}.weight")
        if i in cfg.dual_attention_layers:
            for k, name in enumerate(("to_q", "to_k", "to_v")):
                both(f"{t}.attn2.{name}", f"{b}.x_block.attn2.qkv", part=k, count=3)
            both(f"{t}.attn2.to_out.0", f"{b}.x_block.attn2.proj")
            if cfg.qk_norm:
                out[f"{t}.attn2.norm_q.weight"] = Src(f"{prefix}{b}.x_block.attn2.ln_q.weight")
                out[f"{t}.attn2.norm_k.weight"] = Src(f"{prefix}{b}.x_block.attn2.ln_k.weight")
        both(f"{t}.norm1.linear", f"{b}.x_block.adaLN_modulation.1")
        # the last block's text path ends in a continuous adaLN: (shift, scale) stored, (scale, shift) here
        both(f"{t}.norm1_context.linear", f"{b}.context_block.adaLN_modulation.1", swap=last)
        both(f"{t}.ff.net.0.proj", f"{b}.x_block.mlp.fc1")
        both(f"{t}.ff.net.2", f"{b}.x_block.mlp.fc2")
        if not last:
            both(f"{t}.ff_context.net.0.proj", f"{b}.context_block.mlp.fc1")
            both(f"{t}.ff_context.net.2", f"{b}.context_block.mlp.fc2")
    both("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    both("proj_out", "final_layer.linear")
    return out


def t5_tokenizer_folder(path: Path, release_name: str = "tokenizer_3") -> Path | None:
    """Where T5's tokenizer is for a single file (a file carries none, and imagine ships none: its licence
    would allow it, but no copy can be fetched here): the release's folder name (SD3's ``tokenizer_3/``, Flux's
    ``tokenizer_2/``) or ``t5-tokenizer/`` beside the file."""
    for name in (release_name, "t5-tokenizer", "t5_tokenizer"):
        folder = Path(path).parent / name
        if folder.is_dir():
            return folder
    return None


@torch.no_grad()
def t5_from_weights(w: Weights, source: str, config: dict | None = None):
    """A transformers T5EncoderModel from its tensors in transformers' layout (keys without the prefix); its
    config from ``config`` (imagine's files say it) or the shapes (the relative bias table gives the heads)."""
    from transformers import T5Config, T5EncoderModel

    shared = w.get("shared.weight") or w.get("encoder.embed_tokens.weight")
    if shared is None:
        raise CheckpointError(f"{source}: the T5 encoder has no token embedding (shared.weight)")
    vocab, d_model = shared.shape
    layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("encoder.block."))
    q = w["encoder.block.0.layer.0.SelfAttention.q.weight"].shape
    buckets = w["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in w
    d_ff = w[f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"].shape[0]
    heads = buckets[1]
    made = T5Config.from_dict(config) if config else T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=q[0] // heads, d_ff=d_ff, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=buckets[0], feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False, use_cache=False, dropout_rate=0.0)
    refs = {("shared.weight" if k == "encoder.embed_tokens.weight" else k): r for k, r in w.items()}
    if "encoder.embed_tokens.weight" not in refs:
        refs["encoder.embed_tokens.weight"] = refs["shared.weight"]
    return build_and_fill(lambda: T5EncoderModel(made), refs, f"{source} (T5)").eval()
