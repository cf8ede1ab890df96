"""Training settings: one dataclass, and presets that fill it for common jobs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

from imagine.diffusion.flow import DENSITIES, Density
from imagine.diffusion.parametrization import Prediction
from imagine.diffusion.schedules import BetaSchedule

Precision = Literal["fp32", "bf16"]


# the denoiser architectures a run can train: the UNet; DiT (class-conditional, adaLN-Zero); PixArt's DiT
# (cross-attention to the text, adaLN-single); SD3's MMDiT (joint attention of text and image tokens)
Arch = Literal["unet", "dit", "pixart", "mmdit", "flux"]
# a transformer of the small UNet presets' size (~2M parameters): 6 blocks of 128 wide, 2 x 2 patches
TRANSFORMER_SMALL = {"num_attention_heads": 4, "attention_head_dim": 32, "num_layers": 6, "patch_size": 2}
TRANSFORMER_TINY = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "patch_size": 2}
ARCHS: tuple[str, ...] = get_args(Arch)


@dataclass(frozen=True)
class TrainConfig:
    # data
    data: str | None = None  # the preset's dataset, used when the command line names none
    image_size: int = 32
    class_conditional: bool = False
    label_dropout: float = 0.1  # drop labels this often so classifier-free guidance works
    text_conditional: bool = False  # cross-attend to the caption's text-encoder states
    caption_dropout: float = 0.1  # train on the empty prompt this often, for classifier-free guidance
    # Gaussian noise on the text states in training, this many times their RMS (per sample): nearby phrasings
    # then land on the same denoising (an augmentation; 0: off)
    text_noise: float = 0.0
    text_encoder: str = "minilm"
    vae_preset: str | None = None  # latent models: with no --vae, train one with this VAE preset first
    flip: bool = False
    default_cfg: float = 5.0  # written into the model's diffusion.json: generation's guidance unless told
    # super-resolution stages (diffusion/superres.py): sr_scale > 1 trains a stage that makes images sr_scale
    # times larger, in pixels, conditioned on the target degraded by that factor and noise-augmented at a
    # random level of noise_levels (a class embedding); sr_crop > 0 trains on random crops of that size
    # (the network is convolutional, so it then runs on whole images of any size)
    sr_scale: int = 1
    sr_crop: int = 0
    noise_levels: int = 0
    default_noise_level: int = 0  # written into diffusion.json: the augmentation generation uses unless told
    # this share of pairs take as input the scene drawn small by the renderer (builtin:shapes), the rest the
    # target degraded (antialiased bicubic): a base model's 64 px images look like the former
    sr_native: float = 0.0
    # optimization
    steps: int = 1000  # the total: a resumed run with more steps trains on to it
    batch_size: int = 32  # global, over all processes and accumulation steps
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 100
    lr_decay_from: float = 1.0  # from this fraction of the steps on, decay linearly to 10% of lr at the end
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    precision: Precision = "fp32"
    # diffusion
    schedule: BetaSchedule = "linear"
    prediction: Prediction = "eps"
    min_snr_gamma: float | None = None
    flow_density: Density = "logit_normal"  # prediction flow: where training times fall (diffusion/flow.py)
    flow_shift: float = 1.0  # prediction flow: the model's sampling shift, recorded in its spec (SD3: 3)
    offset_noise: float = 0.0
    learned_variance: bool = False
    # network: the denoiser's architecture and its config fields (channels and classes are filled from the data)
    arch: Arch = "unet"
    unet: dict[str, Any] = field(default_factory=dict)  # UNetConfig fields (arch unet)
    # the transformer's fields (arch dit, pixart, mmdit or flux): heads, head dim, layers, patch size (a Flux's
    # layers: half double-stream blocks, half single-stream, unless num_single_layers says; its patches are 2 x 2)
    transformer: dict[str, Any] = field(default_factory=lambda: dict(TRANSFORMER_SMALL))
    # bookkeeping
    seed: int = 0
    checkpoint_every: int = 500
    sample_every: int = 500
    log_every: int = 10
    keep_checkpoints: int = 2

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        if self.arch not in ARCHS:
            raise ValueError(f"architecture {self.arch!r} unknown; choose one of: {', '.join(ARCHS)}")
        if self.flow_density not in DENSITIES:
            raise ValueError(f"flow density {self.flow_density!r} unknown; choose one of: {', '.join(DENSITIES)}")
        if not self.flow_shift > 0:
            raise ValueError(f"flow_shift must be > 0, got {self.flow_shift}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {self.precision!r} unknown; choose fp32 or bf16")
        if not 0 < self.lr_decay_from <= 1:
            raise ValueError(f"lr_decay_from must lie in (0, 1], got {self.lr_decay_from}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.sr_scale < 1:
            raise ValueError(f"sr_scale must be >= 1, got {self.sr_scale}")
        if self.sr_scale > 1:
            if self.image_size % self.sr_scale:
                raise ValueError(f"image size {self.image_size} is not a multiple of the scale {self.sr_scale}")
            if self.sr_crop and (self.sr_crop > self.image_size or self.sr_crop % 8):
                raise ValueError(f"sr_crop {self.sr_crop} must be a multiple of 8 no larger than the image size "
                                 f"{self.image_size}")
            if self.vae_preset is not None or self.class_conditional:
                raise ValueError("super-resolution stages train in pixels, on captioned or plain images "
                                 "(no VAE, no classes)")
            if not 0 <= self.sr_native <= 1:
                raise ValueError(f"sr_native is a share of training pairs in [0, 1], got {self.sr_native}")
            if not 0 <= self.default_noise_level < max(1, self.noise_levels):
                raise ValueError(f"default_noise_level {self.default_noise_level} is outside "
                                 f"0..{self.noise_levels - 1}")

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


_PIXEL_SMALL = dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=32,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), mid_block_type=None)

PRESETS: dict[str, TrainConfig] = {
    # seconds on a laptop CPU: for tests and smoke runs
    "tiny": TrainConfig(
        image_size=16, steps=30, batch_size=16, lr=1e-3, warmup_steps=5, checkpoint_every=10, sample_every=0,
        log_every=1, ema_decay=0.9, transformer=dict(TRANSFORMER_TINY),
        unet=dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                  mid_block_type=None)),
    # a sensible default for a small dataset (digits, icons): 16x16 to 32x32, ~1M parameters
    "small": TrainConfig(
        image_size=16, steps=4000, batch_size=64, lr=5e-4, warmup_steps=200, checkpoint_every=500, sample_every=500,
        schedule="cosine", prediction="v", min_snr_gamma=5.0, precision="bf16", unet=_PIXEL_SMALL),
}
PRESETS["digits"] = replace(PRESETS["small"], class_conditional=True)
# a DiT in seconds (tests and smoke runs): 16x16 pixels as 64 patches of 2x2
PRESETS["tiny-dit"] = replace(PRESETS["tiny"], arch="dit", class_conditional=True)

_T2I_SMALL = dict(block_out_channels=(48, 96, 96), layers_per_block=1, norm_num_groups=16,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=4)
# text to image in a VAE's latents (64x64 images, 16x16x4 latents with a factor-4 VAE)
PRESETS["t2i"] = TrainConfig(
    image_size=64, text_conditional=True, steps=2000, batch_size=32, lr=5e-4, warmup_steps=100,
    checkpoint_every=250, sample_every=500, schedule="scaled_linear", prediction="v", min_snr_gamma=5.0,
    precision="bf16", unet=_T2I_SMALL, vae_preset="vae-shapes")
# the model that ships inside the package (imagine/weights/shapes-default): t2i trained longer, the last
# 30% with a decaying learning rate. Its first 2,000 steps are exactly the t2i preset's (same seed, same
# schedule up to there), so a t2i run resumes into it.
# Its guidance default is measured: ShapesEval 0.43 at CFG 3 against 0.35 at CFG 5 (150 prompts); on 60
# prompts CFG 1.5 and 2 gave 0.42, 3 gave 0.45, 4 0.35, 8 0.25.
PRESETS["shapes-default"] = replace(PRESETS["t2i"], data="builtin:shapes", steps=6000, lr_decay_from=0.7,
                                    default_cfg=3.0)
# the shipped model taught the shapes language: shapes-default's network and weights (--init) trained on
# builtin:shapes-language (its templates half the time, the train half of data/shapes_language.py otherwise)
PRESETS["shapes-language"] = replace(PRESETS["shapes-default"], data="builtin:shapes-language", steps=6000,
                                     lr=3e-4, warmup_steps=100, lr_decay_from=0.6, checkpoint_every=250)
# the next default (issue 18): attention at every latent level (16x16 too, where a 64 px image's layout is
# still spatial), wider, the pooled text states joining the timestep embedding (diffusers' addition_embed_type
# "text"), trained on builtin:shapes-language (templates and the train half of the shapes language) with a
# larger batch; 8.2M parameters, 16.3 MB in fp16. Made for a GPU: benchmarks/default_ablation.py measures
# each of these choices, and the README gives what its training cost.
_T2I_WIDE = dict(block_out_channels=(64, 128, 128), layers_per_block=1, norm_num_groups=16,
                 down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                 mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=4, addition_embed_type="text",
                 addition_embed_type_num_heads=8)
PRESETS["shapes-wide"] = replace(PRESETS["t2i"], data="builtin:shapes-language", steps=20000, batch_size=128,
                                 lr=4e-4, warmup_steps=500, lr_decay_from=0.7, checkpoint_every=1000,
                                 sample_every=2000, default_cfg=3.0, unet=_T2I_WIDE)
# seconds: for tests
PRESETS["tiny-t2i"] = replace(
    PRESETS["t2i"], image_size=16, steps=20, batch_size=8, warmup_steps=5, checkpoint_every=10, sample_every=0,
    log_every=1, ema_decay=0.9, precision="fp32", vae_preset="vae-tiny", transformer=dict(TRANSFORMER_TINY),
    unet=dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
                                                                                       "CrossAttnUpBlock2D"),
              mid_block_type=None, attention_head_dim=2))

# super-resolution stages (imagine train-sr): Imagen's Efficient U-Net in pixels (more resnets at low
# resolution, skips scaled by 1/sqrt(2), downsample-first), text cross-attention at the lowest level and the
# middle only (where there are few positions), trained on crops of the target (the network is convolutional);
# 2.5M parameters, 5 MB in fp16
_SR_UNET = dict(block_out_channels=(32, 48, 64, 64), layers_per_block=(1, 1, 2, 2), norm_num_groups=8,
                down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
                mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=4, skip_scale=2 ** -0.5,
                downsample_first=True)
PRESETS["sr"] = TrainConfig(
    data="builtin:shapes", image_size=256, sr_scale=4, sr_crop=64, noise_levels=250, default_noise_level=0,
    text_conditional=True, steps=2000, batch_size=16, lr=3e-4, warmup_steps=100, lr_decay_from=0.7,
    checkpoint_every=250, sample_every=500, schedule="cosine", prediction="v", min_snr_gamma=5.0,
    precision="bf16", default_cfg=1.0, unet=_SR_UNET)
PRESETS["tiny-sr"] = replace(
    PRESETS["sr"], image_size=32, sr_scale=2, sr_crop=16, noise_levels=20, default_noise_level=2, steps=6,
    batch_size=4, warmup_steps=2, lr_decay_from=1.0, checkpoint_every=3, sample_every=0, log_every=1,
    ema_decay=0.9, precision="fp32", unet=dict(block_out_channels=(8, 16), layers_per_block=(1, 2), norm_num_groups=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type=None,
                                attention_head_dim=2, skip_scale=2 ** -0.5, downsample_first=True))


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} unknown; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
