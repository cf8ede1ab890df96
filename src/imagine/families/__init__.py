"""What a model family is, as data (STYLE rule 16): the denoiser network and how it is called, the latent
format, the parametrization it was trained with, the conditioning it takes, how a checkpoint of it is
recognised, and which attachments fit it. The loaders (io/) and the pipeline read a family; they never test
for one. imagine's own models, Stable Diffusion 1.x, 2.x and XL are the four entries; a new family is one
more entry here (ComfyUI's supported_models.py, latent_formats.py and model_sampling.py hold the same idea).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from imagine.diffusion.parametrization import Prediction

NETWORK_LABELS = {"unet": "a UNet", "dit": "DiT", "pixart": "PixArt's DiT", "mmdit": "SD3's MMDiT",
                  "flux": "Flux's transformer"}
# Everything that can attach to a denoiser (adapters/): the kinds a family lists as fitting it.
AttachmentKind = Literal["lora", "embedding", "controlnet", "t2i_adapter", "ip_adapter"]
UNET_ATTACHMENTS: frozenset[str] = frozenset({"lora", "embedding", "controlnet", "t2i_adapter", "ip_adapter"})


@dataclass(frozen=True)
class LatentFormat:
    """How a VAE's latents are scaled into the space diffusion runs in: z' = (z - shift_factor) * scaling_factor."""

    channels: int = 4
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    downscale: int = 8  # pixels per latent position, a side


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: where its weights sit in each layout and what it is."""

    part: str  # the part's name for LoRA keys and diffusers folders: text_encoder, text_encoder_2
    architecture: str  # what transformers builds: "CLIPTextModel" or "CLIPTextModelWithProjection"
    activation: str  # its MLP's activation (OpenAI's CLIP: quick_gelu; OpenCLIP: gelu): tells SD 1 from SD 2
    single_file_prefix: str  # where its tensors sit in an original single-file checkpoint
    layout: Literal["clip", "open_clip", "t5"]  # the single file's key layout (io/ldm_keys.py)
    optional: bool = False  # a folder may leave it out (SD3's T5: diffusers runs without it, zeros in its place)


@dataclass(frozen=True)
class Family:
    name: str  # what a record and `imagine models` call it: imagine, sd1, sd2, sdxl
    label: str  # for people
    network: Literal["unet", "dit", "pixart", "mmdit", "flux"]  # the denoiser architecture (models/)
    latent: LatentFormat | None  # fixed by the family; None: the model's own VAE says (imagine's models)
    image_size: int  # the side it was trained at, what generation uses when the user gives no size
    prediction: Prediction  # what its denoiser predicts where the checkpoint does not say
    text_encoders: tuple[TextEncoderSlot, ...] = ()
    attention_heads: int | None = None  # a UNet's heads where no tensor says (SD 1.x: 8); None: 64 wide
    clip_skip: int = 1  # the text layer its denoiser was trained on (1: the last), where the file does not say
    # SDXL's extra inputs: the pooled text and the size/crop ids ("micro-conditioning", Podell et al. 2023)
    micro_conditioning: bool = False
    pooled_input: Literal["pooled_projections"] | None = None  # MMDiT's: the pooled text as the network's input
    zero_empty_negative: bool = False  # an empty negative prompt is a zero context, not the encoded ""
    # the SDXL refiner's micro-conditioning: an aesthetic score in place of the target size, (positive branch,
    # negative branch), diffusers' and A1111's defaults
    aesthetic_score: tuple[float, float] | None = None
    attachments: frozenset[str] = UNET_ATTACHMENTS
    # how kohya's LoRA files name its UNet's modules: diffusers' names (SD 1.x, 2.x) or the original layout's
    # (kohya's SDXL files: lora_unet_input_blocks_...)
    kohya_unet_names: Literal["diffusers", "ldm"] = "diffusers"
    modelspec: str | None = None  # the modelspec.architecture a single file declares (kohya, A1111)
    diffusers_pipeline: str | None = None  # the model_index.json class of its diffusers folders
    # how its prompts become the denoiser's text inputs (models/text_encoders.py): one CLIP, SDXL's two,
    # SD3's two CLIPs and T5; None: imagine's own encoder, named in the model's spec
    prompt_encoder: Literal["clip", "dual_clip", "refiner", "sd3", "flux", "t5"] | None = None
    text_length: int = 77  # T5's token budget where the family's prompt encoder is T5 alone (PixArt: 120, 300)
    # PixArt-alpha 1024's micro-conditions: the image's (height, width) and aspect ratio, as network inputs
    size_conditioning: bool = False
    aspect_bins: bool = False  # generated at the closest aspect bucket it trained at (PixArt; families/aspect_bins)
    # where the diffusers folder keeps the denoiser: unet/, or transformer/ (the transformer families)
    denoiser_folder: str = "unet"
    # a flow family's unshifted sampling grid ends at the last training time (diffusers' scheduler), or at
    # 1 / steps (Flux's pipeline)
    flow_grid_end: Literal["train", "steps"] = "train"

    def conditioning(self, pooled: torch.Tensor | None, width: int, height: int, context: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None, negative: bool = False) -> dict[str, torch.Tensor]:
        """The denoiser's inputs beyond the text states, for rows of text (their ``pooled`` vectors, or their
        token states ``context`` (B, T, D) and ``mask`` (B, T)) at this output size; ``negative``: the
        unconditional branch's rows (the refiner's lower aesthetic score)."""
        if self.size_conditioning:  # PixArt-alpha: resolution and aspect ratio (a network without them ignores them)
            n = len(context) if context is not None else 1
            return {"resolution": torch.tensor([[float(height), float(width)]]).expand(n, -1),
                    "aspect_ratio": torch.tensor([[height / width]]).expand(n, -1)}
        if self.pooled_input == "pooled_projections":  # MMDiT, Flux: the pooled text joins the timestep's vector
            if pooled is None:  # the sentence vector of an encoder that gives none: its tokens' masked mean
                if context is None:
                    raise ValueError(f"a {self.label} network needs the pooled text or the text states")
                weights = (mask.float() if mask is not None else torch.ones(context.shape[:2]))[..., None]
                pooled = (context.float() * weights).sum(1) / weights.sum(1).clamp(min=1)
            return {"pooled_projections": pooled}
        if not self.micro_conditioning:
            return {}
        if pooled is None:
            raise ValueError(f"a {self.label} UNet needs a pooled text embedding; its text encoder gives none "
                             "(use the checkpoint's own text encoders)")
        # (original h, w, crop top, left, target h, w): original and target the output size, no crop, as
        # A1111 and diffusers default to
        if self.aesthetic_score is not None:  # the refiner: (original h, w, crop top, left, aesthetic score)
            score = self.aesthetic_score[1 if negative else 0]
            ids = torch.tensor([[height, width, 0, 0, score]], dtype=torch.float32).expand(len(pooled), -1)
            return {"text_embeds": pooled, "time_ids": ids}
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(len(pooled), -1)
        return {"text_embeds": pooled, "time_ids": ids}

    def takes(self, spec) -> dict[str, bool]:
        """Which request fields and attachment kinds act on a model of this family with this spec (the web UI
        hides or disables the others rather than ignore them)."""
        return {"clip_skip": self.prompt_encoder not in ("t5", "flux"),
                "distilled_cfg_scale": bool(getattr(spec, "distilled_guidance", False)),
                "resolution_binning": self.aspect_bins,
                "inpainting_mask_weight": getattr(spec, "conditioning_channels", 0) == 5,
                "image_cfg_scale": getattr(spec, "conditioning_channels", 0) == 4,
                **{kind: kind in self.attachments for kind in sorted(UNET_ATTACHMENTS)}}

    def check_attachment(self, kind: str, what: str, made_for: str | None = None) -> None:
        """Refuse, naming the family, an attachment kind that does not fit it, or a unit made for another
        denoiser architecture (``made_for``: a ControlNet's)."""
        if kind not in self.attachments:
            raise ValueError(f"{what} is a {kind.replace('_', '-')}, which does not fit a {self.label} model; it "
                             f"takes: {', '.join(sorted(self.attachments)) or 'no attachments'}")
        if made_for is not None and made_for != self.network:
            raise ValueError(f"{what} was made for {made_for} models ({NETWORK_LABELS.get(made_for, made_for)}); "
                             f"the model here is {self.label} ({self.network}): pick one made for it")


_CLIP_L = dict(architecture="CLIPTextModel", activation="quick_gelu", layout="clip")
SD_LATENT = LatentFormat(channels=4, scaling_factor=0.18215)

IMAGINE = Family("imagine", "imagine", "unet", None, image_size=32, prediction="eps")
SD1 = Family("sd1", "Stable Diffusion 1.x", "unet", SD_LATENT, image_size=512, prediction="eps", attention_heads=8,
             text_encoders=(TextEncoderSlot("text_encoder", single_file_prefix="cond_stage_model.transformer.",
                                            **_CLIP_L),),
             modelspec="stable-diffusion-v1", diffusers_pipeline="StableDiffusionPipeline", prompt_encoder="clip")
# SD 2.x reads OpenCLIP ViT-H's penultimate layer; its 768 px releases predict v
SD2 = Family("sd2", "Stable Diffusion 2.x", "unet", SD_LATENT, image_size=768, prediction="v",
             text_encoders=(TextEncoderSlot("text_encoder", "CLIPTextModel", "gelu", "cond_stage_model.model.",
                                            "open_clip"),),
             clip_skip=2, modelspec="stable-diffusion-v2", diffusers_pipeline="StableDiffusionPipeline",
             prompt_encoder="clip")
SDXL = Family("sdxl", "Stable Diffusion XL", "unet", LatentFormat(channels=4, scaling_factor=0.13025),
              image_size=1024, prediction="eps",
              text_encoders=(TextEncoderSlot("text_encoder", single_file_prefix="conditioner.embedders.0.transformer.",
                                             **_CLIP_L),
                             TextEncoderSlot("text_encoder_2", "CLIPTextModelWithProjection", "gelu",
                                             "conditioner.embedders.1.model.", "open_clip")),
              clip_skip=2, micro_conditioning=True, zero_empty_negative=True, kohya_unet_names="ldm",
              modelspec="stable-diffusion-xl-v1-base", diffusers_pipeline="StableDiffusionXLPipeline",
              prompt_encoder="dual_clip")
# the SDXL refiner (Podell et al. 2023, sec. 2.5): a UNet for the last, low-noise steps, reading OpenCLIP bigG
# alone and an aesthetic score; A1111 and diffusers run it after the base model ("Refiner switch at")
SDXL_REFINER = Family("sdxl-refiner", "Stable Diffusion XL refiner", "unet", SDXL.latent, image_size=1024,
                      prediction="eps",
                      text_encoders=(TextEncoderSlot("text_encoder_2", "CLIPTextModelWithProjection", "gelu",
                                                     "conditioner.embedders.0.model.", "open_clip"),),
                      clip_skip=2, micro_conditioning=True, aesthetic_score=(6.0, 2.5), kohya_unet_names="ldm",
                      modelspec="stable-diffusion-xl-v1-refiner", diffusers_pipeline="StableDiffusionXLImg2ImgPipeline",
                      prompt_encoder="refiner")

# imagine's own transformers, trained here (diffusion transformers take LoRAs and embeddings; the UNet's
# ControlNets, T2I-Adapters and IP-Adapters do not fit them; an MMDiT takes ControlNets made for it)
TRANSFORMER_ATTACHMENTS: frozenset[str] = frozenset({"lora", "embedding"})
IMAGINE_DIT = Family("imagine-dit", "imagine DiT", "dit", None, image_size=32, prediction="flow",
                     attachments=TRANSFORMER_ATTACHMENTS)
IMAGINE_PIXART = Family("imagine-pixart", "imagine PixArt-style DiT", "pixart", None, image_size=32,
                        prediction="flow", attachments=TRANSFORMER_ATTACHMENTS)
IMAGINE_MMDIT = Family("imagine-mmdit", "imagine MMDiT", "mmdit", None, image_size=32, prediction="flow",
                       pooled_input="pooled_projections", attachments=TRANSFORMER_ATTACHMENTS | {"controlnet"})
# Stable Diffusion 3 / 3.5 (Esser et al. 2024): an MMDiT over 16-channel latents, rectified flow with a shift
# of 3, CLIP-L + CLIP-G (penultimate layers, pooled outputs concatenated) and T5-XXL
SD3_LATENT = LatentFormat(channels=16, scaling_factor=1.5305, shift_factor=0.0609)
SD3 = Family("sd3", "Stable Diffusion 3", "mmdit", SD3_LATENT, image_size=1024, prediction="flow",
             text_encoders=(TextEncoderSlot("text_encoder", "CLIPTextModelWithProjection", "quick_gelu",
                                            "text_encoders.clip_l.transformer.", "clip"),
                            TextEncoderSlot("text_encoder_2", "CLIPTextModelWithProjection", "gelu",
                                            "text_encoders.clip_g.transformer.", "open_clip"),
                            TextEncoderSlot("text_encoder_3", "T5EncoderModel", "gelu_new",
                                            "text_encoders.t5xxl.transformer.", "t5", optional=True)),
             clip_skip=2, pooled_input="pooled_projections", attachments=TRANSFORMER_ATTACHMENTS | {"controlnet"},
             modelspec="stable-diffusion-v3-medium", diffusers_pipeline="StableDiffusion3Pipeline",
             prompt_encoder="sd3", denoiser_folder="transformer")
# Flux.1 [dev] and [schnell]: double- and single-stream blocks over 2 x 2-packed 16-channel latents, flow with
# a resolution-dependent shift ([dev]) or none ([schnell]), T5-XXL states and CLIP-L's pooled vector; [dev]
# embeds a distilled guidance scale and runs without CFG
FLUX = Family("flux", "Flux.1", "flux", LatentFormat(channels=16, scaling_factor=0.3611, shift_factor=0.1159),
              image_size=1024, prediction="flow",
              text_encoders=(TextEncoderSlot("text_encoder", "CLIPTextModel", "quick_gelu",
                                             "text_encoders.clip_l.transformer.", "clip"),
                             TextEncoderSlot("text_encoder_2", "T5EncoderModel", "gelu_new",
                                             "text_encoders.t5xxl.transformer.", "t5")),
              pooled_input="pooled_projections", attachments=TRANSFORMER_ATTACHMENTS, modelspec="flux-1-dev",
              diffusers_pipeline="FluxPipeline", prompt_encoder="flux", denoiser_folder="transformer",
              flow_grid_end="steps")
# PixArt-alpha and -Sigma (Chen et al. 2023, 2024): a DiT cross-attending to T5-XXL's masked states
# (adaLN-single), eps with a learned variance on the VP schedule, SD's VAE (alpha) or SDXL's (Sigma)
_T5_SLOT = TextEncoderSlot("text_encoder", "T5EncoderModel", "gelu_new", "text_encoders.t5xxl.transformer.", "t5")
PIXART_ALPHA = Family("pixart-alpha", "PixArt-alpha", "pixart", SD_LATENT, image_size=1024, prediction="eps",
                      text_encoders=(_T5_SLOT,), attachments=frozenset({"lora"}),
                      diffusers_pipeline="PixArtAlphaPipeline", prompt_encoder="t5", text_length=120,
                      size_conditioning=True, aspect_bins=True, denoiser_folder="transformer")
PIXART_SIGMA = Family("pixart-sigma", "PixArt-Sigma", "pixart", LatentFormat(channels=4, scaling_factor=0.13025),
                      image_size=1024, prediction="eps", text_encoders=(_T5_SLOT,), attachments=frozenset({"lora"}),
                      diffusers_pipeline="PixArtSigmaPipeline", prompt_encoder="t5", text_length=300,
                      size_conditioning=True, aspect_bins=True, denoiser_folder="transformer")
IMAGINE_FLUX = Family("imagine-flux", "imagine Flux-style transformer", "flux", None, image_size=32,
                      prediction="flow", pooled_input="pooled_projections", attachments=TRANSFORMER_ATTACHMENTS)

FAMILIES: Mapping[str, Family] = {f.name: f for f in (IMAGINE, SD1, SD2, SDXL, SDXL_REFINER, SD3, FLUX, PIXART_ALPHA,
                                                       PIXART_SIGMA,
                                                       IMAGINE_DIT, IMAGINE_PIXART, IMAGINE_MMDIT, IMAGINE_FLUX)}
# imagine's own models by their denoiser network's class
OWN_BY_NETWORK: Mapping[str, Family] = {"UNet2DConditionModel": IMAGINE, "DiTTransformer2DModel": IMAGINE_DIT,
                                        "PixArtTransformer2DModel": IMAGINE_PIXART,
                                        "SD3Transformer2DModel": IMAGINE_MMDIT,
                                        "FluxTransformer2DModel": IMAGINE_FLUX}


def of_network(network) -> Family:
    """The family of one of imagine's own networks (SDXL's where a UNet takes its micro-conditioning)."""
    if getattr(network.config, "addition_embed_type", None) == "text_time":
        return of_unet_config(network.config)
    return OWN_BY_NETWORK.get(type(network).__name__, IMAGINE)


def text_width(config) -> int | None:
    """The width of the text states a denoiser network reads (None: it reads none)."""
    for name in ("cross_attention_dim", "caption_channels", "joint_attention_dim"):
        if name == "cross_attention_dim" and hasattr(config, "caption_channels"):
            continue  # PixArt's cross_attention_dim is its blocks' width; it reads caption_channels
        if getattr(config, name, None):
            return getattr(config, name)
    return None
# the Stable Diffusion families, in the order a checkpoint is tested against them (most specific first)
CHECKPOINT_FAMILIES: tuple[Family, ...] = (SDXL, SDXL_REFINER, SD2, SD1)
# the families whose diffusers pipeline folders imagine reads
PIPELINE_FAMILIES: tuple[Family, ...] = (*CHECKPOINT_FAMILIES, SD3, FLUX, PIXART_ALPHA, PIXART_SIGMA)


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model family {name!r} unknown; imagine knows: {', '.join(FAMILIES)}") from None


def of_unet_config(config) -> Family:
    """The family a UNet belongs to by what it takes: SDXL's micro-conditioning marks SDXL; the context
    width tells SD 2.x's OpenCLIP (1024) from SD 1.x's CLIP (768); anything else is imagine's own."""
    if getattr(config, "addition_embed_type", None) == "text_time":  # the refiner reads bigG alone (1280 wide)
        return SDXL_REFINER if getattr(config, "cross_attention_dim", None) == 1280 else SDXL
    return {1024: SD2, 768: SD1}.get(getattr(config, "cross_attention_dim", None), IMAGINE)


def from_single_file(keys) -> Family | None:
    """The Stable Diffusion family whose last text encoder's tensors an original single file carries."""
    keys = list(keys)
    for fam in CHECKPOINT_FAMILIES:
        if any(k.startswith(fam.text_encoders[-1].single_file_prefix) for k in keys):
            return fam
    return None


# pipelines whose folders hold a family's very parts (an inpainting UNet reads 9 channels): read as the family
INPAINT_PIPELINES = {"StableDiffusionPipeline": "StableDiffusionInpaintPipeline",
                     "StableDiffusionXLPipeline": "StableDiffusionXLInpaintPipeline"}
INSTRUCT_PIPELINES = {"StableDiffusionPipeline": "StableDiffusionInstructPix2PixPipeline",
                      "StableDiffusionXLPipeline": "StableDiffusionXLInstructPix2PixPipeline"}
PIPELINE_ALIASES = {v: k for table in (INPAINT_PIPELINES, INSTRUCT_PIPELINES) for k, v in table.items()}


def from_diffusers(pipeline_class: str, text_encoder_config) -> Family | None:
    """The family of a diffusers pipeline folder: its model_index.json class, then (SD 1.x and 2.x share
    one class) its text encoder's activation."""
    pipeline_class = PIPELINE_ALIASES.get(pipeline_class, pipeline_class)
    if pipeline_class == SDXL_REFINER.diffusers_pipeline and text_encoder_config:
        pipeline_class = SDXL.diffusers_pipeline  # an SDXL base saved from its img2img pipeline (it has CLIP-L)
    candidates = [f for f in PIPELINE_FAMILIES if f.diffusers_pipeline == pipeline_class]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    cfg = text_encoder_config
    act = cfg.get("hidden_act") if isinstance(cfg, dict) else getattr(cfg, "hidden_act", None)
    return next((f for f in candidates if f.text_encoders[0].activation == act), candidates[-1])


def diffusers_pipelines() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*(f.diffusers_pipeline for f in PIPELINE_FAMILIES if f.diffusers_pipeline),
                                *PIPELINE_ALIASES]))
