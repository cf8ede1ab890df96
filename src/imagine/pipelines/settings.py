"""The settings of a generation request: one typed object, the schema every door follows (STYLE rule 14).

Each field carries its schema beside its type and default: the help people read, the CLI option that sets it
(and its default where a command's differs), whether and how the job API takes it (its default and bounds:
server/schemas.py builds JobRequest's settings fields from these), and which kinds of request it applies to.
tests/e2e/test_request_schema.py checks the CLI's options, the job API and the web UI against it field by
field, so adding a setting is a field here and its handling, and nothing else by hand. Options are Literal
and "not given" is None, never a 0 or -1 sentinel.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, get_args, get_type_hints

from imagine.data.transforms import RESIZE_MODES, ResizeMode
from imagine.io.onnx import Backend, check_backend
from imagine.samplers import SigmaSchedule, check_schedule, resolve

# What the masked region starts from before inpainting: A1111's "Masked content" 0 to 3, in order.
InpaintFill = Literal["fill", "original", "latent_noise", "latent_nothing"]
INPAINT_FILLS: tuple[str, ...] = get_args(InpaintFill)
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
Kind = Literal["txt2img", "img2img", "inpaint", "edit"]
KINDS: tuple[str, ...] = get_args(Kind)
EDITS = ("img2img", "inpaint")
FROM_IMAGE = (*EDITS, "edit")  # the kinds that start from an init image
SAMPLED = ("txt2img", *EDITS)  # the kinds that walk a sampler from noise (an edit walks DDIM from its inversion)
MAX_HIRES_SCALE = 8.0  # hires fix and SR upscaling make images at most this many times larger
MAX_CFG = 100.0  # classifier-free guidance past this only saturates (1e308 made black images)
MAX_PROMPT = 4000  # characters: the APIs' bound on a prompt
MAX_OUTPAINT = 4096  # pixels an outpainting border may add on one side
OUTPAINT = ("outpaint_left", "outpaint_right", "outpaint_up", "outpaint_down")
_SAME = object()


def setting(default: Any, help: str, *, cli: str | None = "", cli_default: Any = _SAME, api: bool = True,
            api_default: Any = _SAME, kinds: tuple[str, ...] = KINDS, **bounds: Any):
    """A settings field with its schema. cli: the option's name ("": --NAME with dashes; None: not an option,
    e.g. the prompt, an argument); cli_default: the CLI's default where it differs (None: "not given", the
    model's own), a dict by command where commands differ; api: whether the job API takes it; api_default:
    the job API's default where it differs; kinds: the requests it applies to; bounds: the job API's (ge, le,
    gt, lt, max_length)."""
    return field(default=default, metadata={
        "help": help, "cli": cli, "cli_default": default if cli_default is _SAME else cli_default, "api": api,
        "api_default": default if api_default is _SAME else api_default, "kinds": kinds, "bounds": bounds})


@dataclass(frozen=True)
class Settings:
    prompt: str = setting("", "What to draw. A1111 emphasis works: (word:1.3), [word].", cli=None,
                          max_length=MAX_PROMPT)
    negative_prompt: str = setting("", "What not to draw.", cli="--negative", max_length=MAX_PROMPT)
    steps: int = setting(20, "Sampling steps (default: the model's).", cli_default=None, api_default=None, ge=1)
    sampler: str = setting("dpmpp_2m", "Sampler: ours or A1111's name ('DPM++ 2M Karras'; default: the model's).",
                           cli_default=None, api_default=None, kinds=SAMPLED)
    schedule: SigmaSchedule | None = setting(None, "Sigma schedule: default or karras (default: what the sampler "
                                                   "name implies).", kinds=SAMPLED)
    cfg_scale: float = setting(5.0, "Classifier-free guidance scale (default: the model's).", cli="--cfg",
                               cli_default=None, api_default=None, ge=0, le=MAX_CFG)
    guidance_rescale: float = setting(0.0, "Guidance rescale phi in [0, 1] (Lin et al. 2023).", cli="--rescale",
                                      ge=0, le=1)
    distilled_cfg_scale: float = setting(3.5, "Flux [dev]'s distilled guidance scale (Forge's Distilled CFG "
                                              "Scale): an input of guidance-distilled models, which run without "
                                              "CFG (cfg 1).", cli="--distilled-cfg", ge=0, le=MAX_CFG)
    resolution_binning: bool = setting(True, "PixArt: generate at the closest of the aspect ratios the model trained "
                                             "at, then resize and centre-crop to the size asked (diffusers' "
                                             "use_resolution_binning).", kinds=("txt2img",))
    seed: int = setting(0, "Seed of the first image; image i uses seed + i. -1 (or none on the APIs): a random "
                           "one, reported and recorded like any seed.",
                        api_default=None, ge=-1, lt=2**63)
    n: int = setting(1, "How many images; image i uses seed + i.", ge=1, kinds=SAMPLED)
    width: int | None = setting(None, "Width in pixels (a multiple of the latent factor; default: the model's).",
                                ge=8)
    height: int | None = setting(None, "Height in pixels (a multiple of the latent factor; default: the model's).",
                                 ge=8)
    strength: float = setting(0.75, "In (0, 1]: how much of the schedule runs from the noised init image (1 "
                                    "ignores it; an edit inverts this far).",
                              cli_default={"img2img": 0.75, "inpaint": 1.0, "edit": 1.0}, kinds=FROM_IMAGE, gt=0,
                              le=1)
    mask_blur: int = setting(4, "Gaussian blur radius of the mask, in pixels.", kinds=("inpaint",), ge=0, le=64)
    resize_mode: ResizeMode = setting("just_resize", "How the init image meets the output size: stretch, crop to "
                                                     "cover, fit and fill the borders, or resize the latent "
                                                     "(A1111's resize modes).", kinds=FROM_IMAGE)
    # inpaint: what the masked region starts from. Latent noise, because it draws a new object where asked
    # 2.5x as often as the original (0.62 against 0.25 at strength 0.75: benchmarks/inpaint_eval.py)
    inpaint_fill: InpaintFill = setting("latent_noise", "What the masked region starts from: its surroundings' "
                                        "colours (fill), the original, latent noise or nothing (A1111's Masked "
                                        "content).", cli="--masked-content", kinds=("inpaint",))
    inpaint_only_masked: bool = setting(False, "Inpaint the mask's box at the full output size and paste it back "
                                               "(A1111's Inpaint area: Only masked).", cli="--only-masked",
                                        kinds=("inpaint",))
    inpaint_padding: int = setting(32, "Pixels around the mask's box, with only-masked.",
                                   cli="--only-masked-padding", kinds=("inpaint",), ge=0, le=1024)
    mask_invert: bool = setting(False, "Regenerate where the mask is black.", cli="--invert-mask",
                                kinds=("inpaint",))
    # outpaint: the canvas grown by these borders (pixels) around the init image; the new border (and mask blur
    # pixels into the image, for the seam) is inpainted, any mask given marks more to redo inside the image
    outpaint_left: int = setting(0, "Outpainting: pixels added on the left (the new border is inpainted).",
                                 cli="--left", kinds=("inpaint",), ge=0, le=MAX_OUTPAINT)
    outpaint_right: int = setting(0, "Outpainting: pixels added on the right.", cli="--right", kinds=("inpaint",),
                                  ge=0, le=MAX_OUTPAINT)
    outpaint_up: int = setting(0, "Outpainting: pixels added at the top.", cli="--up", kinds=("inpaint",), ge=0,
                               le=MAX_OUTPAINT)
    outpaint_down: int = setting(0, "Outpainting: pixels added at the bottom.", cli="--down", kinds=("inpaint",),
                                 ge=0, le=MAX_OUTPAINT)
    # edit: the image inverted under source_prompt (DDIM run backwards), then sampled with the prompt
    source_prompt: str = setting("", "Editing by inversion: what the image shows (the prompt it is inverted "
                                     "with); the prompt says what it should show (the same: its reconstruction).",
                                 cli="--from-prompt", kinds=("edit",), max_length=MAX_PROMPT)
    null_text: bool = setting(False, "Editing: null-text inversion (Mokady et al. 2022), which optimises the "
                                     "unconditional text per step so the image comes back under guidance; slower.",
                              kinds=("edit",))
    edit_mask: bool = setting(True, "Editing: change only where the two prompts' predictions differ (DiffEdit's "
                                    "mask) and keep the rest of the image's pixels.", kinds=("edit",))
    image_cfg_scale: float = setting(1.5, "Instruct models (InstructPix2Pix): how closely to keep to the image "
                                          "(A1111's Image CFG scale; 1: the image branch alone).",
                                     cli="--image-cfg", kinds=("img2img",), ge=0, le=MAX_CFG)
    inpainting_mask_weight: float = setting(1.0, "Inpainting models: how much of the masked region the model's "
                                                 "image input hides (A1111's inpainting conditioning mask "
                                                 "strength; 0 shows it the whole image).", cli="--mask-weight",
                                            kinds=EDITS, ge=0, le=1)
    # A1111's refiner: a second model takes over for the last steps (the SDXL refiner, or any model that works
    # in the same latent space)
    refiner: str | None = setting(None, "A second model that takes the last steps (A1111's Refiner: the SDXL "
                                        "refiner, or any model of the same latent space): a name from the models "
                                        "list or a path.", kinds=SAMPLED)
    refiner_switch_at: float = setting(0.8, "The fraction of the schedule after which the refiner takes over "
                                            "(A1111's Refiner switch at; diffusers' denoising_end).",
                                       kinds=SAMPLED, gt=0, le=1)
    watermark: bool = setting(False, "Write Stable Diffusion's invisible watermark (DWT-DCT) into the pixels, so "
                                     "the image can be told as generated after its metadata is gone (images of "
                                     "256 x 256 pixels or more).", api=False)
    clip_skip: int | None = setting(None, "Text states from the N-th last layer of the text encoder (A1111's Clip "
                                          "skip; 1: the last; default: the model's).", ge=1, le=48)
    noise_seed_delta: int = setting(0, "Stochastic samplers draw their noise from seed + this (A1111's eta noise "
                                       "seed delta, ENSD); the starting noise stays the seed's.",
                                    ge=-(2**31), lt=2**31, kinds=SAMPLED)
    precision: Precision = setting("fp32", "fp32, or bf16 autocast for the network (faster on CPUs with bf16).",
                                   api=False, kinds=("txt2img",))
    backend: Backend = setting("torch", "What runs the networks: torch, or an ONNX export under ONNX Runtime "
                                        "(fp32, or its UNet dynamically quantized to int8).", kinds=SAMPLED)
    compile: bool = setting(False, "torch.compile the UNet: a minute or so once per process and input shape, then "
                                   "faster steps (its kernels round differently: pixels may move by a level).",
                            api=False, kinds=("txt2img",))
    # txt2img, then larger (pipelines/upscale.py): A1111's hires fix (upscale, then img2img at hires_strength
    # with the same model) or, with hires_strength 0, a plain upscale such as an SR cascade
    hires_scale: float = setting(1.0, "A1111's hires fix: upscale by this factor after the first pass, then "
                                      "img2img at hires strength with the same model (1: off).", cli="--hires",
                                 cli_default=None, kinds=("txt2img",), ge=1, le=MAX_HIRES_SCALE)
    hires_upscaler: str = setting("Lanczos", "How hires fix upscales: a resampler (Lanczos, Bicubic, ...), Latent, "
                                             "or an SR stage or cascade by name or path.", cli_default=None,
                                  kinds=("txt2img",))
    hires_strength: float = setting(0.7, "Denoising strength of the hires pass (0: upscale only).",
                                    kinds=("txt2img",), ge=0, le=1)
    hires_steps: int | None = setting(None, "Steps of the hires pass (default: as many as the first).",
                                      kinds=("txt2img",), ge=1)
    sr_noise_level: int | None = setting(None, "SR stages' noise-augmentation level (default: each stage's own; "
                                               "higher invents more detail).", cli="--noise-level",
                                         kinds=("txt2img",), ge=0)
    tile: int | None = setting(None, "Sample in overlapping tiles of this many pixels a side (default: whole "
                                     "images): for sizes whose activations would not fit in memory.", ge=32,
                                 kinds=SAMPLED)
    vae_tile: int | None = setting(None, "Decode with the VAE in overlapping tiles of this many pixels a side "
                                         "(default: whole images, or tiles when decoding them whole would not fit "
                                         "in memory: the plan picks the size, and the record keeps it).", ge=64,
                                     kinds=SAMPLED)

    @classmethod
    def from_record(cls, record: dict) -> Settings:
        """Settings as a PNG's JSON record stores them. Records before 0.2 carry "batched" (a one-call mode
        that gave up batch invariance); every run is now batched and batch invariant, so it is dropped.
        Earlier records wrote "not given" as 0 for hires_steps and tile; that is None now."""
        data = {k: v for k, v in record.items() if k != "batched"}
        data.setdefault("resolution_binning", False)  # records before it: generated at the size asked
        for name in ("hires_steps", "tile", "vae_tile"):
            if data.get(name) == 0:
                data[name] = None
        return cls(**data)

    def with_model_defaults(self, spec, steps: int | None, sampler: str | None, cfg_scale: float | None) -> Settings:
        """These settings with the model's own defaults (its diffusion.json) where the user gave None."""
        return replace(self, steps=spec.default_steps if steps is None else steps,
                       sampler=spec.default_sampler if sampler is None else sampler,
                       cfg_scale=spec.default_cfg if cfg_scale is None else cfg_scale)

    def validate(self) -> Settings:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.n < 1:
            raise ValueError(f"the number of images must be >= 1, got {self.n}")
        for name in ("cfg_scale", "guidance_rescale", "distilled_cfg_scale", "strength"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not 0 <= self.cfg_scale <= MAX_CFG:
            raise ValueError(f"cfg_scale must lie in [0, {MAX_CFG:g}] (3 to 12 is usual), got {self.cfg_scale:g}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0 (image i uses seed + i), got {self.seed!r}")
        if not isinstance(self.noise_seed_delta, int):
            raise ValueError(f"noise seed delta must be an integer, got {self.noise_seed_delta!r}")
        last = self.seed + self.n - 1 + max(0, self.noise_seed_delta)
        if last >= 2**63 or self.seed + min(0, self.noise_seed_delta) < 0:
            raise ValueError(f"seed {self.seed} with {self.n} images and noise seed delta {self.noise_seed_delta} "
                             f"leaves the seeds' range [0, 2**63): choose a seed below {2**63 - self.n}")
        for name in ("prompt", "negative_prompt", "source_prompt"):
            text = getattr(self, name)
            if "\x00" in text:
                raise ValueError(f"the {name.replace('_', ' ')} holds a NUL character: remove it")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"the {name.replace('_', ' ')} is not valid Unicode (a lone surrogate): "
                                 "send UTF-8 text") from None
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength must lie in (0, 1], got {self.strength}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} unknown; choose one of: {', '.join(PRECISIONS)}")
        if self.mask_blur < 0:
            raise ValueError(f"mask blur must be >= 0, got {self.mask_blur}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {self.resize_mode!r} unknown; choose one of: {', '.join(RESIZE_MODES)}")
        if self.inpaint_fill not in INPAINT_FILLS:
            raise ValueError(f"inpaint fill {self.inpaint_fill!r} unknown; choose one of: {', '.join(INPAINT_FILLS)}")
        if self.inpaint_padding < 0:
            raise ValueError(f"inpaint padding must be >= 0 pixels, got {self.inpaint_padding}")
        for name in OUTPAINT:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_OUTPAINT:
                raise ValueError(f"{name.replace('_', ' ')} must be a whole number of pixels in [0, {MAX_OUTPAINT}], "
                                 f"got {v!r}")
        if self.clip_skip is not None and (not isinstance(self.clip_skip, int) or self.clip_skip < 1):
            raise ValueError(f"clip skip must be an integer >= 1 (1: the last layer), got {self.clip_skip!r}")
        if not isinstance(self.hires_scale, (int, float)) or not 1 <= self.hires_scale <= MAX_HIRES_SCALE:
            raise ValueError(f"hires scale must lie in [1, {MAX_HIRES_SCALE:g}], got {self.hires_scale!r}")
        if not isinstance(self.hires_strength, (int, float)) or not 0 <= self.hires_strength <= 1:
            raise ValueError(f"hires strength (denoising strength of the second pass) must lie in [0, 1], got "
                             f"{self.hires_strength!r}")
        if self.hires_steps is not None and (not isinstance(self.hires_steps, int) or self.hires_steps < 1):
            raise ValueError(f"hires steps must be an integer >= 1 (or none: as many as the first pass), got "
                             f"{self.hires_steps!r}")
        if self.tile is not None and (not isinstance(self.tile, int) or self.tile < 32):
            raise ValueError(f"tile must be at least 32 pixels (or none: no tiling), got {self.tile!r}")
        if self.vae_tile is not None and (not isinstance(self.vae_tile, int) or self.vae_tile < 64):
            raise ValueError(f"vae_tile must be at least 64 pixels (or none: decode whole), got {self.vae_tile!r}")
        if self.sr_noise_level is not None and (not isinstance(self.sr_noise_level, int) or self.sr_noise_level < 0):
            raise ValueError(f"the SR noise level must be an integer >= 0, got {self.sr_noise_level!r}")

        if not isinstance(self.refiner_switch_at, (int, float)) or not 0 < self.refiner_switch_at <= 1:
            raise ValueError(f"refiner switch at must lie in (0, 1] (the fraction of the schedule the first model "
                             f"runs), got {self.refiner_switch_at!r}")
        check_backend(self.backend)
        if self.backend != "torch" and (self.precision != "fp32" or self.compile):
            raise ValueError(f"the {self.backend} backend runs its own kernels: bf16 autocast and --compile are "
                             "torch's; use precision fp32 without compile, or --backend torch")
        resolve(self.sampler)
        if self.schedule is not None:  # A1111's "Schedule type" names too, as ours
            return replace(self, schedule=check_schedule(self.schedule))
        return self

    @property
    def outpaint(self) -> tuple[int, int, int, int]:
        """The outpainting borders (left, up, right, down) in pixels; all 0 when not outpainting."""
        return self.outpaint_left, self.outpaint_up, self.outpaint_right, self.outpaint_down

    def to_dict(self) -> dict:
        return asdict(self)


def schema(name: str) -> dict[str, Any]:
    """A field's schema (setting's metadata) with its type, as the doors read it."""
    f = next(f for f in fields(Settings) if f.name == name)
    return {"name": f.name, "type": get_type_hints(Settings)[name], "default": f.default, **f.metadata}


def schemas() -> list[dict[str, Any]]:
    return [schema(f.name) for f in fields(Settings)]
