"""Tiny random Stable Diffusion pipelines (SD 1.x, SD 2.x v-prediction, SDXL), built offline by diffusers
and transformers from configs, with CLIP's real tokenizer (the BPE imagine ships): what the loaders, the
converters and the parity tests run on. diffusers is a test-only oracle."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 49408  # CLIP's, so the real tokenizer's ids fit


def _perturb(model, scale: float = 0.05):
    with torch.no_grad():  # non-trivial norms and biases too, so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _text_config(hidden: int, act: str, **extra):
    from transformers import CLIPTextConfig

    extra = {"num_attention_heads": 2, **extra}
    return CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                          max_position_embeddings=77, hidden_act=act, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=1, **extra)


def components(arch: str, seed: int = 0, in_channels: int = 4) -> dict:
    """diffusers/transformers modules for a tiny ``arch`` ("sd1", "sd2", "sdxl") pipeline; in_channels 9: an
    inpainting UNet (the latent, the mask and the masked image's latents)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from imagine.io.stable_diffusion import clip_tokenizer

    torch.manual_seed(seed)
    unet_common = dict(sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, norm_num_groups=4,
                       block_out_channels=(8, 16))
    if arch == "sd1":
        unet = UNet2DConditionModel(**unet_common, cross_attention_dim=32, attention_head_dim=2,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    elif arch == "sd2":
        unet = UNet2DConditionModel(**unet_common, cross_attention_dim=32, attention_head_dim=(2, 4),
                                    use_linear_projection=True,
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    else:
        unet = UNet2DConditionModel(**{**unet_common, "block_out_channels": (8, 16, 16)}, cross_attention_dim=64,
                                    attention_head_dim=(2, 2, 4), transformer_layers_per_block=(1, 2, 2),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=16, scaling_factor=0.13025 if arch == "sdxl" else 0.18215)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction" if arch == "sd2" else "epsilon",
                                       timestep_spacing="trailing", steps_offset=0)
    out = {"unet": _perturb(unet), "vae": _perturb(vae), "scheduler": scheduler}
    if arch == "sdxl":
        out["text_encoder"] = _perturb(CLIPTextModel(_text_config(32, "quick_gelu")))
        out["text_encoder_2"] = _perturb(CLIPTextModelWithProjection(_text_config(32, "gelu", projection_dim=32)))
        out["tokenizer"], out["tokenizer_2"] = clip_tokenizer(), clip_tokenizer("!")
    else:
        out["text_encoder"] = _perturb(CLIPTextModel(_text_config(32, "quick_gelu" if arch == "sd1" else "gelu")))
        out["tokenizer"] = clip_tokenizer() if arch == "sd1" else clip_tokenizer("!")
    return out


def pipeline(arch: str, seed: int = 0):
    """The diffusers pipeline object for a tiny ``arch``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = components(arch, seed)
    if arch == "sdxl":
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_inpaint_pipeline(arch: str, folder: Path, seed: int = 0):
    """A tiny 9-channel inpainting pipeline (StableDiffusion(XL)InpaintPipeline) saved as a diffusers folder."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    parts = components(arch, seed, in_channels=9)
    if arch == "sdxl":
        pipe = StableDiffusionXLInpaintPipeline(**parts, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionInpaintPipeline(**parts, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def write_instruct_pipeline(folder: Path, seed: int = 0):
    """A tiny 8-channel InstructPix2Pix pipeline (SD 1.x) saved as a diffusers folder."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(**components("sd1", seed, in_channels=8), safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def write_pipeline(arch: str, folder: Path, seed: int = 0):
    """A tiny ``arch`` pipeline saved as a diffusers folder (safetensors); returns the pipeline."""
    pipe = pipeline(arch, seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def write_refiner(folder: Path, seed: int = 1, vae=None):
    """A tiny SDXL refiner (StableDiffusionXLImg2ImgPipeline without text_encoder/: OpenCLIP bigG alone, the
    aesthetic score among the time ids) saved as a diffusers folder; ``vae``: the base model's, whose latents it
    refines."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    from imagine.io.stable_diffusion import clip_tokenizer

    parts = components("sdxl", seed)
    torch.manual_seed(seed + 100)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=4,
                                block_out_channels=(8, 16, 16), cross_attention_dim=32, attention_head_dim=(2, 2, 4),
                                transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=32 + 5 * 8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    text = _perturb(CLIPTextModelWithProjection(_text_config(32, "gelu", projection_dim=32)))
    pipe = StableDiffusionXLImg2ImgPipeline(vae=vae if vae is not None else parts["vae"], text_encoder=None,
                                            text_encoder_2=text, tokenizer=None, tokenizer_2=clip_tokenizer("!"),
                                            unet=_perturb(unet), scheduler=parts["scheduler"],
                                            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


# --- the transformer families: SD3 (CLIP-L, CLIP-G, T5 and an MMDiT) --------------------------------------

T5_WORDS = ("a an the red blue green yellow purple orange white black circle square triangle star above below "
            "left right of and on in with blurry low quality photo small big").split()


def t5_tokenizer():
    """A T5 tokenizer (sentencepiece-style unigram, "</s>" at the end, "<pad>" padding) over a small vocabulary,
    built offline with the tokenizers library: every lower-case word falls back to letters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0) for w in T5_WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,.()!:0123456789"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def t5_encoder(width: int = 64, vocab: int | None = None, inferable: bool = False):
    """inferable: T5's default relative-position buckets (32, distance 128), which a single file's shapes imply."""
    from transformers import T5Config, T5EncoderModel

    buckets = dict() if inferable else dict(relative_attention_num_buckets=8, relative_attention_max_distance=16)
    config = T5Config(vocab_size=vocab or len(t5_tokenizer()), d_model=width, d_kv=16, d_ff=2 * width, num_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
                      use_cache=False, **buckets)
    return _perturb(T5EncoderModel(config))


def sd3_components(seed: int = 0, t5: bool = True, inferable: bool = False) -> dict:
    """A tiny StableDiffusion3Pipeline's modules: CLIP-L and CLIP-G with projections (their pooled outputs
    concatenated: 64), T5 (64 wide, the joint attention width), a 2-block MMDiT over 16-channel latents, SD3's
    16-channel VAE with its scale and shift (factor 2: 16 px images), the flow scheduler with SD3's shift 3.
    inferable: text encoders whose configs separate files' shapes imply (one CLIP head; T5's default buckets)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from imagine.io.stable_diffusion import clip_tokenizer

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
                                        pos_embed_max_size=16)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=4,
                        layers_per_block=1, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)
    heads = {"num_attention_heads": 1} if inferable else {}
    out = {"transformer": _perturb(transformer), "vae": _perturb(vae),
           "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
           "text_encoder": _perturb(CLIPTextModelWithProjection(_text_config(32, "quick_gelu", projection_dim=32,
                                                                             **heads))),
           "text_encoder_2": _perturb(CLIPTextModelWithProjection(_text_config(32, "gelu", projection_dim=32,
                                                                               **heads))),
           "tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer("!"),
           "text_encoder_3": t5_encoder(inferable=inferable) if t5 else None,
           "tokenizer_3": t5_tokenizer() if t5 else None}
    return out


def write_sd3(folder: Path, seed: int = 0, t5: bool = True, inferable: bool = False):
    """A tiny SD3 pipeline saved as a diffusers folder; returns the pipeline."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**sd3_components(seed, t5, inferable))
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


# --- Flux.1 [dev] and [schnell]: CLIP-L (pooled), T5, the double/single-stream transformer ------------------

def flux_components(seed: int = 0, dev: bool = True, inferable: bool = False) -> dict:
    """A tiny FluxPipeline's modules: CLIP-L (its pooled output, 32 wide), T5 (64 wide, the context), a Flux
    transformer with 1 double- and 1 single-stream block over 2 x 2-packed 16-channel latents (with the guidance
    embedding for [dev]), Flux's VAE scale and shift (factor 2: 16 px images), and the flow scheduler as each
    release configures it ([dev]: the resolution-dependent shift; [schnell]: none). inferable: parts whose configs
    separate single files' shapes imply (CLIP heads 64 wide, 32 groups in the VAE, T5's default buckets)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from imagine.io.stable_diffusion import clip_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                         pooled_projection_dim=32, guidance_embeds=dev, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(block_out_channels=(32, 32) if inferable else (8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=16, norm_num_groups=32 if inferable else 4, layers_per_block=1,
                        sample_size=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096) if dev else FlowMatchEulerDiscreteScheduler(shift=1.0)
    clip = _text_config(64, "quick_gelu", num_attention_heads=1) if inferable else _text_config(32, "quick_gelu")
    if inferable:
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                             pooled_projection_dim=64, guidance_embeds=dev, axes_dims_rope=(2, 6, 8))
    return {"transformer": _perturb(transformer), "vae": _perturb(vae), "scheduler": scheduler,
            "text_encoder": _perturb(CLIPTextModel(clip)), "tokenizer": clip_tokenizer(),
            "text_encoder_2": t5_encoder(inferable=inferable), "tokenizer_2": t5_tokenizer()}


def write_flux(folder: Path, seed: int = 0, dev: bool = True, inferable: bool = False):
    """A tiny Flux pipeline saved as a diffusers folder; returns the pipeline."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**flux_components(seed, dev, inferable))
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


# --- PixArt-alpha and -Sigma: T5 (masked) and the cross-attention DiT --------------------------------------

def pixart_components(seed: int = 0, sigma: bool = False, sample_size: int = 8) -> dict:
    """A tiny PixArt pipeline's modules: T5 (64 wide), a 2-block PixArt transformer predicting eps and its
    variance (8 output channels), SD's (alpha) or SDXL's (Sigma) VAE scale, DPM-Solver++ on the linear VP
    schedule, as the releases configure it."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, cross_attention_dim=16, sample_size=sample_size, patch_size=2,
                                           caption_channels=64, norm_type="ada_norm_single",
                                           norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=16, scaling_factor=0.13025 if sigma else 0.18215)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                            prediction_type="epsilon")
    return {"transformer": _perturb(transformer), "vae": _perturb(vae), "scheduler": scheduler,
            "text_encoder": t5_encoder(), "tokenizer": t5_tokenizer()}


def write_pixart(folder: Path, seed: int = 0, sigma: bool = False, sample_size: int = 8):
    """sample_size 32: the smallest the pipelines bin resolutions for (their 256 px buckets)."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    pipe = (PixArtSigmaPipeline if sigma else PixArtAlphaPipeline)(**pixart_components(seed, sigma, sample_size))
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
