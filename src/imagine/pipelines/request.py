"""One generation request, end to end (STYLE rule 14): the CLI, the job API and the A1111 endpoints all
build a ``Request`` and hand it to ``run``, which generates every image and describes it (A1111's
parameters text and our JSON record); ``save`` writes the PNGs. A new feature adds a field here and its
handling once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from PIL import Image, UnidentifiedImageError

from imagine.a1111 import parse_prompt_attention, prompt_loras
from imagine.adapters import ATTACHMENTS
from imagine.adapters.attachment import Attachment, by_kind
from imagine.adapters.control import resolve_units
from imagine.adapters.embeddings import resolve_embeddings
from imagine.adapters.image_prompt import resolve_prompts
from imagine.adapters.lora import LoraUse
from imagine.data.vocabulary import caption_vocabulary, unknown_words
from imagine.devices import module_device, resolve_device, text_modules
from imagine.io.lora_keys import lora_metadata
from imagine.io.model_folder import DiffusionModel
from imagine.io.models_dir import resolve
from imagine.io.networks import load_clip
from imagine.io.png import file_hash
from imagine.io.provenance import add_watermark, can_watermark, sign
from imagine.io.stable_diffusion import load_any
from imagine.models.clip import CLIPScorer
from imagine.models.text_encoders import load_text_encoder
from imagine.nn.compact import FP8, compute_dtypes
from imagine.nn.compact import describe as describe_compact
from imagine.pipelines import generate as g
from imagine.pipelines import memory
from imagine.pipelines.inversion import check_edit, edit
from imagine.pipelines.memory import MemoryPlan
from imagine.pipelines.memory import plan as memory_plan
from imagine.pipelines.offload import MODES as OFFLOAD_MODES
from imagine.pipelines.offload import Offload
from imagine.pipelines.output import Generated
from imagine.pipelines.rerank import txt2img_reranked
from imagine.pipelines.settings import Settings
from imagine.pipelines.unconditional import to_uint8
from imagine.pipelines.upscale import hires, hires_size, resolve_upscaler
from imagine.weights import default_clip

Kind = Literal["txt2img", "img2img", "inpaint", "edit"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass(frozen=True)
class Request:
    kind: Kind
    settings: Settings
    init_image: Image.Image | None = field(default=None, repr=False)  # img2img and inpaint
    mask: Image.Image | None = field(default=None, repr=False)  # inpaint: white = regenerate
    rerank: int = 1  # txt2img: keep the best of K candidates per image by CLIP score
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in every image's JSON (inputs, job id)
    loras: tuple[tuple[str, float], ...] = ()  # (name in the models folder's Lora/ or file, weight)
    models_dir: Path | None = None  # where LoRA names (and <lora:NAME:W> tags in the prompt) are looked up
    embeddings: tuple[str, ...] = ()  # textual-inversion files or names always in use (besides the folder's)
    lora_strict: bool = True  # False: a LoRA's unmatched keys are a warning, not an error
    controls: tuple = ()  # ControlUnits (adapters/control.py): ControlNets and T2I-Adapters, any number
    image_prompts: tuple = ()  # ImagePromptUnits (adapters/image_prompt.py): IP-Adapter prompts, any number
    # what check() resolved the LoRAs, embeddings, control units and image prompts to: one list of
    # attachments (adapters/attachment.py), loaded and checked against the model, in that order
    attached: tuple[Attachment, ...] = field(default=(), repr=False)
    resolved_upscaler: object = field(default=None, repr=False)  # hires fix's Upscaler (pipelines/upscale.py)
    warnings: tuple[str, ...] = ()  # what the user should know before trusting the images; filled by check()
    refiner: tuple | None = field(default=None, repr=False)  # settings.refiner loaded: (model, text encoder)
    sign_key: object = field(default=None, repr=False)  # an Ed25519 private key: each image's record is signed
    inversion: object = field(default=None, repr=False)  # edit: an Inversion made before (pipelines/inversion.py)
    confined: bool = False  # a server's request: LoRAs, control and IP-Adapter models, embeddings and upscalers
    # by name in models_dir only, never by path (io/models_dir.resolve)

    def check(self, model: DiffusionModel) -> Request:
        """Everything that can be refused before any work, refused now: settings, inputs, sizes. Returns the
        request with the output size filled in from the init image where none was given."""
        s = self.settings.validate()
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} unknown; choose one of: {', '.join(KINDS)}")
        if self.kind != "txt2img" and self.init_image is None:
            raise ValueError(f"{self.kind} needs an init image")
        if any(s.outpaint) and self.kind != "inpaint":
            raise ValueError("outpainting borders grow the canvas of an inpaint request; ask for inpaint (imagine "
                             "outpaint, the APIs' kind inpaint)")
        if self.kind == "inpaint":
            if self.mask is None and not any(s.outpaint):
                raise ValueError("inpaint needs a mask (white = regenerate, black = keep), or outpainting borders")
            if self.mask is not None and self.mask.size != self.init_image.size:
                raise ValueError(f"the mask is {self.mask.width}x{self.mask.height} but the image is "
                                 f"{self.init_image.width}x{self.init_image.height}: they must be the same size")
        if (s.refiner is None) != (self.refiner is None):
            raise ValueError("the refiner named in the settings was not loaded (load it with load_text_model and pass "
                             "it as the request's refiner)" if s.refiner else
                             "a refiner model was given without settings.refiner naming it")
        if self.refiner is not None:
            if self.kind == "edit" or self.rerank > 1:
                raise ValueError("a refiner takes the last steps of txt2img, img2img and inpaint (not an edit by "
                                 "inversion or reranked candidates)")
            if s.backend != "torch" or s.tile:
                raise ValueError("a refiner runs on the torch backend, untiled: leave backend and tile at their "
                                 "defaults")
            g.check_refiner(model, self.refiner[0])
        if self.kind == "edit":  # inversion walks the deterministic sampler: DDIM (Euler's step for flow models)
            s = replace(s, sampler="euler" if model.spec.prediction == "flow" else "ddim", schedule=None)
        if self.rerank < 1:
            raise ValueError(f"rerank takes K >= 1 candidates per image, got {self.rerank}")
        if self.rerank > 1 and self.kind != "txt2img":
            raise ValueError("rerank works with txt2img only")
        if s.precision == "fp32" and compute_dtypes(model.unet) - {torch.float32}:
            kind = "fp8" if FP8 in describe_compact(model.unet) else "bf16"
            raise ValueError(f"this model was loaded with {kind} weights, which run under bf16 autocast only: ask "
                             "for precision bf16 (--precision bf16), or load it in fp32")
        if s.steps > model.spec.num_train_timesteps:
            raise ValueError(f"steps ({s.steps}) cannot exceed the model's {model.spec.num_train_timesteps} "
                             "training timesteps")
        s = self._sized(model, s)
        size = g.output_size(model, s)
        binned = g.sampling_size(model, s, *size) if self.kind == "txt2img" else None
        planned = [g.check_memory(model, *(binned or size), s.n, s.tile, vae_tile=s.vae_tile)]  # a PixArt bucket
        # may be larger than asked
        final = hires_size(model, s) if s.hires_scale > 1 and self.kind == "txt2img" else size
        if s.watermark and not can_watermark(*final):
            raise ValueError(f"the invisible watermark needs images of at least 256 x 256 pixels (its DWT-DCT blocks); "
                             f"these are {final[0]}x{final[1]}: make them larger (--size, hires fix) or leave the "
                             "watermark off")

        if self.controls and self.rerank > 1:
            raise ValueError("rerank does not take control units; generate with controls, or rerank without")
        if self.image_prompts and self.rerank > 1:
            raise ValueError("rerank does not take image prompts; generate with them, or rerank without")
        if self.controls and s.tile:
            raise ValueError("tiled sampling does not take ControlNet or T2I-Adapter units (their maps cover the "
                             "whole image); leave tile unset with them")
        controls = tuple(resolve_units(self.controls, model, size, self.models_dir, confined=self.confined))
        prompts = tuple(resolve_prompts(self.image_prompts, model, self.models_dir, confined=self.confined))
        upscaler = None
        if s.hires_scale > 1:
            if self.kind != "txt2img":
                raise ValueError("hires fix upscales txt2img output; for an existing image use imagine upscale "
                                 "(A1111's Extras) or img2img at the larger size")
            if controls:
                raise ValueError("hires fix with ControlNet or T2I-Adapter units is not supported: generate with "
                                 "the units, then upscale the image (imagine upscale) or img2img it")
            upscaler = resolve_upscaler(s.hires_upscaler, self.models_dir, model, confined=self.confined)

            planned.append(g.check_memory(model, *hires_size(model, s), s.n, s.tile, vae_tile=s.vae_tile))
        texts = [s.prompt, s.negative_prompt]
        loras = self._resolve_loras()
        if s.backend != "torch" and (loras or controls or prompts):
            raise ValueError(f"the {s.backend} backend runs the exported UNet alone: LoRAs, ControlNets, T2I-Adapters "
                             "and image prompts need --backend torch (or merge a LoRA into a model and export that)")
        embeddings = tuple(resolve_embeddings(texts, self.models_dir, self.embeddings, self.confined))
        asked = (*loras, *embeddings, *controls, *prompts)
        attached = tuple(sorted(asked, key=lambda unit: ATTACHMENTS.index(type(unit))))  # stable: each kind in order
        for unit in attached:
            model.family.check_attachment(unit.kind, unit.label, unit.made_for)
        if self.kind == "edit":
            check_edit(model, s, None, attached)
        warnings = vocabulary_warnings(model, s.prompt, s.negative_prompt, loras, embeddings)
        picked = [p.vae_tile for p in planned if p.picked]
        if picked:  # VAE tiling, as decoding whole would not fit: recorded, so --from decodes the same way
            s = replace(s, vae_tile=min(picked))
            warnings = [*warnings, f"decoding in {s.vae_tile} px VAE tiles: the whole image would not fit in the "
                                   "memory free now (the pixels differ slightly from a whole decode; the PNG records "
                                   "the tile, so --from repeats it)"]
        return replace(self, settings=s, attached=attached, resolved_upscaler=upscaler, warnings=warnings)

    def _sized(self, model: DiffusionModel, s: Settings) -> Settings:
        """The settings with the output size filled in from the init image (grown by outpainting borders)."""
        if self.init_image is not None and s.width is None and s.height is None:
            left, up, right, down = s.outpaint
            s = replace(s, width=self.init_image.width + left + right, height=self.init_image.height + up + down)
            if any(s.outpaint):
                _check_canvas(model, s, self.init_image.size)
        return s

    def memory_plans(self, model: DiffusionModel, text_encoder=None) -> list[MemoryPlan]:
        """What the request will hold, stage by stage (pipelines/memory.py), without running or refusing it: its
        pass at the sampling size, and hires fix's second pass when it has one."""
        s = self._sized(model, self.settings.validate())
        size = g.output_size(model, s)
        binned = g.sampling_size(model, s, *size) if self.kind == "txt2img" else None
        free = g.available_memory() if module_device(model.unet).type == "cpu" else None
        plans = [memory_plan(model, *(binned or size), s.n, s.tile, free, text_encoder, vae_tile=s.vae_tile)]
        if self.kind == "txt2img" and s.hires_scale > 1:
            plans.append(memory_plan(model, *hires_size(model, s), s.n, s.tile, free, text_encoder,
                                     vae_tile=s.vae_tile))
        return plans

    def _resolve_loras(self) -> tuple[LoraUse, ...]:
        """The LoRAs asked for (options first, then the prompt's tags), each found as a file."""
        asked = [(name, float(w), "option") for name, w in self.loras]
        for text in (self.settings.prompt, self.settings.negative_prompt):
            asked += [(name, w, "prompt") for name, w in prompt_loras(text)[1]]
        out = []
        for name, weight, source in asked:
            if not isinstance(weight, float) or weight != weight:
                raise ValueError(f"LoRA {name!r}: the weight must be a number")
            try:
                path = resolve(name, self.models_dir, "lora", confined=self.confined)
            except FileNotFoundError as err:
                raise ValueError(f"LoRA {err}") from None
            out.append(LoraUse(name, path, weight, source, self.lora_strict))
        return tuple(out)


def _check_canvas(model: DiffusionModel, s: Settings, image: tuple[int, int]) -> None:
    """An outpainted canvas whose side is no multiple of the latent factor is refused saying which border
    to change (the canvas is the output: resizing it would move the image's own pixels)."""
    f = model.latent_factor
    for name, v, sides, own in (("width", s.width, "--left/--right", image[0]),
                                ("height", s.height, "--up/--down", image[1])):
        if v % f:
            raise ValueError(f"the outpainted canvas's {name} is {v} px ({own} px of image and the borders), not a "
                             f"multiple of {f}, this model's latent factor: add {f - v % f} px (or take {v % f}) "
                             f"to {sides}, or give a width and height to resize to")


def vocabulary_warnings(model: DiffusionModel, prompt: str, negative: str, loras=(), embeddings=()
                        ) -> tuple[str, ...]:
    """A warning per prompt naming its words that no training caption of ``model`` held (none for a model
    that records no vocabulary, such as a Stable Diffusion checkpoint). Embedding names and the words of an
    attached LoRA's metadata (its training prompts or tags) count as known; A1111's syntax is not words."""
    if model.vocabulary is None:
        return ()
    known = set(model.vocabulary)
    for use in embeddings:
        known |= caption_vocabulary(use.embedding.names)
    for use in loras:
        known |= caption_vocabulary(lora_metadata(use.path).values())
    out = []
    for label, text in (("prompt", prompt), ("negative prompt", negative)):
        plain = " ".join(piece for piece, weight in parse_prompt_attention(prompt_loras(text)[0]) if weight >= 0)
        unknown = unknown_words(plain, known)
        if unknown:
            out.append(f"the {label} has words {model.name} never saw in a training caption: {', '.join(unknown)}. "
                       "It can only draw what its captions taught it, and may draw something else for these "
                       f"(the words it knows: vocabulary.json in {model.name})")
    return tuple(out)


@contextmanager
def attached(request: Request, model: DiffusionModel, text_encoder):
    """The request's attachments attached (LoRAs' hooks, embeddings' words) for the duration of the block,
    then detached, the last first (the model and the text encoder are shared between requests)."""
    detach = []
    try:
        for kind, units in by_kind(request.attached).items():
            detach.append(kind.attach(units, model, text_encoder))
        yield
    finally:
        for undo in reversed(detach):
            undo()


def run(request: Request, model: DiffusionModel, text_encoder, *, scorer=None,
        callback: Callable[[dict], None] | None = None, cancel: Callable[[], bool] | None = None) -> list[Generated]:
    """Generate every image of a request and describe each; ``scorer`` (a CLIPScorer) is needed for rerank."""
    request = request.check(model)
    with attached(request, model, text_encoder):
        return _run(request, model, text_encoder, scorer, {"callback": callback, "cancel": cancel})


def _run(request: Request, model: DiffusionModel, text_encoder, scorer, kwargs) -> list[Generated]:
    s, kind, attachments = request.settings, request.kind, request.attached
    kwargs = {**kwargs, "attachments": attachments}
    upscaler = request.resolved_upscaler
    extra = {**request.extra, "upscaler": upscaler.record()} if upscaler is not None else request.extra
    if request.rerank > 1:
        if scorer is None:
            raise ValueError("rerank needs a CLIP scorer")

        out = []
        for r in txt2img_reranked(model, s, text_encoder, scorer, request.rerank, **kwargs):
            # the kept candidate stands alone: its own seed, n = 1, so --from regenerates it by itself
            alone = replace(s, seed=r.seed, n=1)
            image = r.image[None]
            if upscaler is not None:  # hires fix on the kept candidate
                with torch.no_grad():
                    image = hires(model, alone, image, text_encoder, upscaler, **kwargs)
            record_extra = {**extra, "rerank": {"k": request.rerank, "chosen": r.chosen, "scores": r.scores,
                                                "scorer": getattr(scorer, "identity", None)}}
            out.append(_finish(request, model, alone, to_uint8(image)[0], 0, text_encoder, record_extra))
        return out
    first = {**kwargs, "refiner": request.refiner} if request.refiner is not None else kwargs  # the first pass's
    with torch.no_grad():
        if kind == "txt2img":
            images = g.txt2img(model, s, text_encoder, **first)
            if upscaler is not None:
                images = hires(model, s, images, text_encoder, upscaler, **kwargs)
        elif kind == "img2img":
            images = g.img2img(model, s, request.init_image, text_encoder, **first)
        elif kind == "edit":
            images = edit(model, s, request.init_image, text_encoder, inversion=request.inversion, **kwargs)
        else:
            images = g.inpaint(model, s, request.init_image, request.mask, text_encoder, **first)
    return [_finish(request, model, s, pixels, i, text_encoder, extra) for i, pixels in enumerate(to_uint8(images))]


def _finish(request: Request, model: DiffusionModel, s: Settings, pixels, index: int, text_encoder,
            extra: dict) -> Generated:
    """Image ``index`` of a request made whole: its watermark, its description, its signature."""
    if s.watermark:
        pixels = add_watermark(pixels)
    parameters, record = g.describe(model, s, request.kind, index, text_encoder, extra, request.attached,
                                    refiner=request.refiner[0] if request.refiner is not None else None)
    if request.sign_key is not None:
        record = sign(pixels, parameters, record, request.sign_key)
    return Generated(pixels, s.seed + index, parameters, record)


# what --weights-dtype names: the denoiser's storage (the VAE and text encoders stay fp32)
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def load_text_model(path: Path | str, *, vae: Path | str | None = None, allow_pickle: bool = False,
                    weights_dtype: str = "fp32", modules: Sequence[Path | str] = (),
                    device: str | torch.device | None = "cpu", offload: str = "auto") -> tuple[DiffusionModel, object]:
    """A text-to-image model and its text encoder, ready for ``run``: an imagine model folder, a diffusers
    pipeline folder or a single-file checkpoint; ``vae`` replaces its VAE; ``modules``: an SD3 or Flux transformer
    file's separate text encoder (and VAE) files. With
    weights_dtype "bf16" the UNet holds bf16 weights (half the memory, no per-step casts under bf16
    autocast; its norms round differently, so pixels differ from fp32 weights); "fp8" its large matrices in
    scaled fp8 e4m3fn (a quarter of fp32's memory), dequantized layer by layer to bf16 as it computes (nn/compact.py);
    such models run bf16 requests only. A GGUF file's quantized weights stay packed whatever weights_dtype.
    ``device``: where its networks run (devices.resolve_device: "auto", "cpu", "cuda:1", ...). ``offload`` (a GPU's
    concern: on the CPU everything is in memory already): "auto" keeps every network on the device when they fit
    beside a request at the model's own size and otherwise brings each there only to run ("model", or one layer
    at a time: "sequential"; pipelines/offload.py, memory.offload_choice); the pixels are the same."""
    if offload not in ("auto", *OFFLOAD_MODES):
        raise ValueError(f"offload {offload!r} unknown; choose auto, {', '.join(OFFLOAD_MODES)}")
    device = resolve_device(device)
    if weights_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weights dtype {weights_dtype!r} unknown; choose {', '.join(WEIGHT_DTYPES)}")
    model = load_any(path, vae=vae, allow_pickle=allow_pickle, modules=modules, dtype=WEIGHT_DTYPES[weights_dtype])
    if model.spec.text_encoder is None:
        raise ValueError(f"{path} is not a text-to-image model (it has no text encoder); use `imagine sample` "
                         "for class-conditional or unconditional models")
    model.unet.eval()
    if model.vae is not None:
        model.vae.eval()
    encoder = model.text_encoder if model.text_encoder is not None else load_text_encoder(model.spec.text_encoder)
    if device.type == "cpu":
        if offload in ("model", "sequential"):
            raise ValueError(f"--offload {offload} brings networks to a GPU only while they run; on the CPU they are "
                             "all in memory already: leave --offload at auto (or give --device cuda)")
        return model, encoder
    # (a lazy text encoder loads its transformer here, off the CPU path: an ONNX run never imports transformers)
    networks = [model.unet, *([model.vae] if model.vae is not None else []), *text_modules(encoder)]
    mode = offload
    if offload == "auto":
        s = model.spec.image_size
        activations = max(memory.sampling_bytes(model, s, s, 1), memory.decode_bytes(model, s, s, 1))
        mode = memory.offload_choice(networks, activations, memory.available_bytes(device))
    if mode == "none":  # the denoiser, the VAE and the text encoder's transformers all on the device
        for part in networks:
            part.to(device)
    else:
        model.offload = Offload(networks, device, mode)
    return model, encoder


def load_scorer(path: Path | str | None = None):
    """The CLIP scorer for rerank: a folder from `imagine train-clip`, or the one shipped with imagine."""
    path = Path(path) if path is not None else default_clip()
    model = load_clip(path)
    scorer = CLIPScorer(model, load_text_encoder(model.config.text_encoder))
    scorer.identity = str(path)
    return scorer


def open_image(path: Path, what: str) -> Image.Image:
    """An image file read whole, or a ValueError that names the file and the problem in one line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"the {what} {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except Image.DecompressionBombError:
        raise ValueError(f"the {what} {path} is too large to decode safely (over {2 * Image.MAX_IMAGE_PIXELS} "
                         "pixels): scale it down first") from None
    except UnidentifiedImageError:
        raise ValueError(f"the {what} {path} is not an image imagine can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, ValueError) as err:  # truncated data, a text chunk that inflates past Pillow's limit
        raise ValueError(f"cannot read the {what} {path}: {err}") from None


def input_record(path: Path) -> dict[str, str]:
    """How an input file is recorded in an image's JSON: where it was and its hash."""
    return {"path": str(Path(path).resolve()), "sha256_10": file_hash(path)}
