"""Request and response bodies: ours (the job API) and AUTOMATIC1111's (modules/api/models.py shapes)."""

from __future__ import annotations

from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from imagine.pipelines.settings import Settings, schemas

MAX_PROCESSOR_RES = 2048  # a preprocessor's working size: its memory grows with the square


class LoraIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = 1.0

class ControlIn(BaseModel):
    """One control unit (a ControlNet or T2I-Adapter), as the CLI's --control."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="base64 image the preprocessor reads; img2img/inpaint default: "
                                                "the init image")
    module: str = Field("none", description="preprocessor: canny, scribble, segmentation, keypoints, tile, or none "
                                            "(the image already is the condition); GET /controlnet/module_list")
    model: str | None = Field(None, description="a name from GET /controlnet/model_list; default: the one trained "
                                                "for the module's condition")
    weight: float = 1.0
    start: float = Field(0.0, ge=0, le=1, description="fraction of the steps where it starts acting")
    end: float = Field(1.0, ge=0, le=1, description="fraction of the steps where it stops")
    mode: str = Field("balanced", description="balanced, prompt (My prompt is more important) or control "
                                              "(ControlNet is more important)")
    resize_mode: Literal["just_resize", "crop_and_resize", "resize_and_fill"] = "crop_and_resize"
    processor_res: int | None = Field(None, ge=8, le=MAX_PROCESSOR_RES,
                                      description="the preprocessor's short side; default: the output's")
    threshold_a: float | None = None
    threshold_b: float | None = None
    pixel_perfect: bool = False
    kind: Literal["controlnet", "t2i_adapter"] | None = Field(None, description="which kind to look for when no "
                                                                               "model is named")


class ImagePromptIn(BaseModel):
    """One image prompt (an IP-Adapter), as the CLI's --image-prompt."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(..., description="base64 reference image")
    scale: float = Field(1.0, description="the image's weight (lambda); 0 leaves the model as it is")
    model: str | None = Field(None, description="an IP-Adapter from GET /controlnet/model_list or the models "
                                                "folder's ipadapter/; default: the first of `type` that fits")
    type: Literal["content", "palette", "intensity"] = Field("content", description="what the adapter reads: the "
                                                              "image's content, or Composer's colour palette or "
                                                              "intensity")
    start: float = Field(0.0, ge=0, le=1, description="fraction of the steps where it starts acting")
    end: float = Field(1.0, ge=0, le=1, description="fraction of the steps where it stops")


def settings_fields() -> dict[str, Any]:
    """The job API's settings fields, derived from the request's one schema (pipelines/settings.py): each
    Settings field the API takes, with its type, the API's default (None: the model's own, or a random seed),
    its help as the description and its bounds."""
    hints = get_type_hints(Settings)
    out = {}
    for s in schemas():
        if not s["api"]:
            continue
        annotation = hints[s["name"]]
        if s["api_default"] is None:
            annotation = annotation | None
        out[s["name"]] = (annotation, Field(s["api_default"], description=s["help"], **s["bounds"]))
    return out


class _JobFields(BaseModel):
    """What a job is besides its settings: its kind, its images, the model and what attaches to it."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["txt2img", "img2img", "inpaint", "edit"] = Field(
        "txt2img", description="edit: the init image inverted under source_prompt and sampled under the prompt")
    init_image: str | None = None
    mask: str | None = None
    model: str | None = Field(None, description="a name from GET /api/v1/models; default: the current model")
    vae: str | None = Field(None, description="a VAE from GET /api/v1/models (vaes) replacing the model's own; "
                                              "default (or Automatic): the model's")
    text_encoders: list[str] | None = Field(None, max_length=8, description="separate parts of an SD3 or Flux "
                                            "transformer file (clip_l, clip_g, t5xxl, ae) from GET /api/v1/models "
                                            "(text_encoders, vaes); Forge's forge_additional_modules")
    loras: list[LoraIn] = Field(default_factory=list, description="LoRAs from GET /sdapi/v1/loras with their "
                                                                  "weights; <lora:NAME:WEIGHT> in the prompt works too")
    lora_strict: bool = Field(True, description="false: a LoRA key that fits no module is left out with a warning "
                                                "in the job's log instead of failing the request")
    controls: list[ControlIn] = Field(default_factory=list, description="ControlNet and T2I-Adapter units "
                                                                        "(several compose)")
    image_prompts: list[ImagePromptIn] = Field(default_factory=list, description="image prompts (IP-Adapter), "
                                                                             "with or without text; several add up")
    previews: bool = True


# The CLI's parameters, as JSON; images are base64 (a data: URL works too). The settings fields come from the
# request's schema, so the job API cannot drift from the pipeline.
JobRequest = create_model("JobRequest", __base__=_JobFields, __doc__="The CLI's parameters, as JSON. Images are "
                          "base64 (a data: URL works too).", **settings_fields())


class VariationsRequest(BaseModel):
    """Variations of an image (the CLI's `imagine variations`): its embedding drawn anew, n times."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(..., description="base64 image to make variations of")
    n: int = Field(4, ge=1, description="variations; variation i uses seed + i")
    scale: float = Field(1.0, description="the image prompt's weight")
    prompt: str = Field("", max_length=4000, description="text to steer them with (default: none)")
    negative_prompt: str = Field("", max_length=4000)
    ip_adapter: str | None = Field(None, description="the IP-Adapter; default: the first of `type` that fits")
    type: Literal["content", "palette", "intensity"] = Field("content", description="which kind of adapter to "
                                                              "look for when none is named")
    seed: int | None = Field(None, ge=-1, lt=2**63)
    steps: int | None = Field(None, ge=1)
    sampler: str | None = None
    cfg_scale: float | None = None
    model: str | None = None
    previews: bool = True

    def job(self) -> JobRequest:
        return JobRequest(kind="txt2img", prompt=self.prompt, negative_prompt=self.negative_prompt, n=self.n,
                          seed=self.seed, steps=self.steps, sampler=self.sampler, cfg_scale=self.cfg_scale,
                          model=self.model, previews=self.previews,
                          image_prompts=[ImagePromptIn(image=self.image, scale=self.scale, model=self.ip_adapter,
                                                       type=self.type)])


class MergeRequest(BaseModel):
    """A1111's checkpoint merger: weighted sum A (1 - M) + B M, or add difference A + (B - C) M."""

    model_config = ConfigDict(extra="forbid")
    primary: str = Field(..., description="model A: a name from GET /api/v1/models")
    secondary: str = Field(..., description="model B, or an adapter from GET /sdapi/v1/loras (A + M dW)")
    tertiary: str | None = Field(None, description="model C (add-difference only)")
    mode: Literal["weighted-sum", "add-difference"] = "weighted-sum"
    multiplier: float = Field(0.5, ge=-1, le=2, description="M")
    name: str = Field(..., min_length=1, max_length=120, pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$",
                      description="the new model's name in the models folder's Stable-diffusion/")
    format: Literal["safetensors", "folder"] | None = Field(None, description="a single file (Stable Diffusion "
                                                            "models only) or a folder of A's kind; default: A's")
    dtype: Literal["fp16", "bf16", "fp32"] | None = None


class JobCreated(BaseModel):
    id: str
    status: str
    url: str
    warnings: list[str] = Field(default_factory=list, description="what to know before trusting the images "
                                                                   "(words the model never saw in a caption)")


class ImageOut(BaseModel):
    url: str
    base64: str | None
    seed: int
    parameters: str
    info: dict[str, Any]


class JobOut(BaseModel):
    id: str
    kind: str
    model: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: float
    step: int
    total: int
    eta_seconds: float | None
    error: str | None
    warnings: list[str] = Field(default_factory=list, description="what to know before trusting the images "
                                                                   "(words the model never saw in a caption)")
    images: list[ImageOut]
    request: dict[str, Any]
    message: str | None = Field(None, description="why a queued job waits (with a Redis queue: no live worker "
                                                  "serves its model) or was queued again (its worker stopped)")
    worker: str | None = Field(None, description="with a Redis queue: the worker that runs (or ran) it")


# ---- AUTOMATIC1111 (stable-diffusion-webui modules/api/models.py). Fields we do not model are kept (extra
# "allow") so the endpoint can refuse the ones that would change results, and name the rest in `warnings`.

class A1111Txt2Img(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = Field("", max_length=4000)
    negative_prompt: str = Field("", max_length=4000)
    styles: list[str] | None = None
    seed: int = Field(-1, ge=-1, lt=2**63)
    sampler_name: str | None = None
    sampler_index: str | None = None  # older clients
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1)
    cfg_scale: float = 7.0
    distilled_cfg_scale: float = Field(3.5, ge=0, le=100, description="Forge's: Flux [dev]'s distilled guidance")
    resolution_binning: bool = Field(True, description="imagine's: PixArt generates at its closest aspect bucket, "
                                                       "then resizes and crops to the size asked")
    width: int | None = Field(None, ge=8, description="default: the model's size")
    height: int | None = Field(None, ge=8)
    denoising_strength: float | None = Field(None, gt=0, le=1)
    override_settings: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False


class A1111Img2Img(A1111Txt2Img):
    init_images: list[str] = Field(..., min_length=1)
    image_cfg_scale: float | None = Field(None, ge=0, le=100, description="instruct models' (InstructPix2Pix) "
                                          "Image CFG scale; default 1.5")
    mask: str | None = None
    mask_blur: int = Field(4, ge=0, le=64)
    resize_mode: int = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill, "
                                                        "3 just resize (latent upscale)")
    inpainting_fill: int = Field(1, ge=0, le=3, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(False, description="Inpaint area: Only masked")
    inpaint_full_res_padding: int = Field(0, ge=0, le=1024)  # A1111 API default (its UI shows 32)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False


class A1111ImageResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str
    warnings: list[str] = Field(default_factory=list, description="fields sent that this server does not know "
                                                                  "and did not use (imagine's addition)")


class PngInfoRequest(BaseModel):
    image: str


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None
    textinfo: str | None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float
    need_inner_model: bool


class A1111Extras(BaseModel):
    """A1111's Extras (modules/api/models.py ExtrasBaseRequest): upscaling; face restoration is refused."""

    model_config = ConfigDict(extra="allow")

    resize_mode: int = Field(0, ge=0, le=1, description="0: scale by upscaling_resize; 1: to upscaling_resize_w x h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, ge=1, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False
    prompt: str = Field("", max_length=4000, description="imagine's addition: what the picture shows, for "
                                                         "text-conditioned SR stages")
    seed: int = Field(0, ge=0, lt=2**63, description="imagine's addition: the SR stages' noise seed")


class A1111ExtrasSingle(A1111Extras):
    image: str = Field(..., description="base64 PNG or JPEG")


class A1111ExtrasFile(BaseModel):
    data: str
    name: str = ""


class A1111ExtrasBatch(A1111Extras):
    imageList: list[A1111ExtrasFile] = Field(..., min_length=1)  # A1111 spells it so


class A1111ExtrasSingleResponse(BaseModel):
    html_info: str
    image: str


class A1111ExtrasBatchResponse(BaseModel):
    html_info: str
    images: list[str]


class UpscaleRequest(BaseModel):
    """Our Extras: pictures made larger by an upscaler (GET /api/v1/upscalers)."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(..., min_length=1, max_length=16, description="base64 PNG or JPEG pictures")
    scale: float = Field(4.0, ge=1, le=16, description="how many times larger")
    to: tuple[int, int] | None = Field(None, description="[width, height] instead of scale: cover it, then crop")
    crop: bool = True
    upscaler: str = Field("shapes-sr", description="a name from GET /api/v1/upscalers")
    upscaler_2: str | None = Field(None, description="a second upscaler blended in")
    upscaler_2_visibility: float = Field(0.5, ge=0, le=1)
    prompt: str = Field("", max_length=4000, description="what the pictures show (SR stages are text-conditioned)")
    seed: int = Field(0, ge=0, lt=2**63, description="picture i's SR noise comes from seed + i")
    sr_noise_level: int | None = Field(None, ge=0, description="SR noise-augmentation level; default: the stage's")
    tile: int | None = Field(None, ge=32, description="SR stages sample in overlapping tiles of this many pixels; "
                                                     "default: whole pictures")
