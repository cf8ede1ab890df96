"""Training an IP-Adapter (Ye et al. 2023) on a frozen model: only the image projection and the per-layer
image key and value projections learn, with the model's own diffusion loss (train/lora.py's ``fit``:
per-sample randomness, exact resume, atomic checkpoints).

The reference image is not the training image itself most of the time: on builtin:shapes it is a re-render
of the same scene (the same objects, colours and background, placed anew) with probability ``rerender``,
so the adapter learns what is in the picture rather than where every pixel is; on a folder it is the image
flipped and cropped. The text is dropped with probability ``caption_dropout`` and the image (its embedding
zeroed, as at inference for the unconditional rows) with ``image_dropout``, each drawn per sample, so the
adapter works without text (variations) and classifier-free guidance works on the image.

The same loop trains Composer-style global conditions: with ``image_encoder`` palette or intensity the
"embedding" is the reference's colour histogram or luminance layout (models/image_encoders.py)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagine.adapters.image_prompt import Prompted, image_tensor
from imagine.data.shapes import ShapesDataset, compose, render
from imagine.io.ip_adapter_files import IPAdapterFile, save_ip_adapter
from imagine.io.networks import cached_image_encoder, load_image_encoder
from imagine.models.ip_adapter import IPAdapter
from imagine.pipelines.generate import txt2img
from imagine.pipelines.settings import Settings
from imagine.pipelines.unconditional import grid, to_uint8
from imagine.train.loop import Hook
from imagine.train.lora import AdapterTrainConfig, base_record, checkpoint_dir, fit


@dataclass(frozen=True)
class IPAdapterTrainConfig(AdapterTrainConfig):
    image_encoder: str = "shapes-clip"  # shapes-clip, palette, intensity, or a folder
    lr: float = 2e-4
    caption_dropout: float = 0.5
    image_dropout: float = 0.1
    rerender: float = 0.75  # builtin:shapes: the reference is a re-render of the scene this often

    def __post_init__(self):
        super().__post_init__()
        for name in ("caption_dropout", "image_dropout", "rerender"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")


def references(data, images: torch.Tensor, indices, cfg: IPAdapterTrainConfig, t) -> torch.Tensor:
    """The reference image of each training sample, (B, 3, H, W) in [-1, 1]; every draw from (seed, item, t),
    so a resumed run sees the same references."""
    out = []
    for image, index, step_t in zip(images, indices, t, strict=True):
        rng = random.Random(f"ip-reference:{cfg.seed}:{int(index)}:{int(step_t)}")
        if isinstance(data, ShapesDataset) and rng.random() < cfg.rerender:
            scene, _ = data.scene(int(index))
            try:
                again = compose([(o.shape, o.color, o.size) for o in scene.objects], rng,
                                background=scene.background)
                pixels = render(again, data.size)
                out.append(torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(2, 0, 1))
                continue
            except ValueError:  # objects that cannot be placed anew: the image itself
                pass
        ref = image.clone()
        if not isinstance(data, ShapesDataset):  # a user's picture: flipped and cropped
            if rng.random() < 0.5:
                ref = ref.flip(-1)
            h, w = ref.shape[-2:]
            scale = rng.uniform(0.8, 1.0)
            ch, cw = max(8, round(h * scale)), max(8, round(w * scale))
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            ref = torch.nn.functional.interpolate(ref[None, :, top: top + ch, left: left + cw], size=(h, w),
                                                  mode="bilinear", align_corners=False)[0]
        out.append(ref)
    return torch.stack(out)


def train_ip_adapter(model, text_encoder, data, cfg: IPAdapterTrainConfig, out: Path | str, *, resume: bool = False,
                     hooks: tuple[Hook, ...] = (), device: str | torch.device = "cpu") -> Path:
    """Train an IP-Adapter for ``model`` on ``data`` and write it to ``out`` (.safetensors, the original
    layout, which diffusers loads). Checkpoints, the log and sample grids go to OUT-training/ beside it."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: an IP-Adapter is written as .safetensors")
    if model.spec.text_encoder is None or text_encoder is None:
        raise ValueError("IP-Adapter training needs a text-to-image model and its text encoder")
    encoder = load_image_encoder(cfg.image_encoder)
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    model.unet.requires_grad_(False)
    adapter = IPAdapter.from_unet(model.unet, encoder.dim, seed=cfg.seed).train()
    params = {f"adapter.{k}": p for k, p in adapter.named_parameters()}

    def control(images, x_t, t, cond, indices=None):
        refs = references(data, images, indices, cfg, t)
        with torch.no_grad():  # the frozen image encoder stays on the CPU; its embeddings go to the UNet's device
            embeds = encoder.embed(refs).to(x_t.device)
        keep = torch.tensor([random.Random(f"ip-drop:{cfg.seed}:{int(i)}:{int(s)}").random() >= cfg.image_dropout
                             for i, s in zip(indices, t, strict=True)], dtype=embeds.dtype, device=embeds.device)
        tokens = adapter.tokens(embeds * keep[:, None])
        return {"attention_streams": adapter.streams(model.unet, tokens, 1.0)}

    fit(model, text_encoder, data, cfg, root, params, text_grad=False, resume=resume, hooks=hooks,
        must_match={"image_encoder": cfg.image_encoder}, control=control,
        context={"ip_adapter": adapter, "image_encoder": encoder.name}, device=device, modules=(adapter,))
    adapter.eval().requires_grad_(False)
    info = {"training": asdict(cfg), **base_record(model)}
    return save_ip_adapter(adapter, out, encoder.name, info)


def ip_sample_hook(items: list[tuple[np.ndarray, str]], every: int, steps: int = 20, seeds: int = 3,
                   text: str = ""):
    """Every ``every`` steps (and at the last): one row per held-out item: the reference, then the model's
    output for the image prompt alone (with ``text``) at ``seeds`` seeds, under OUT-training/samples/."""
    def hook(info, context):
        if info is None or not every or not items or (info.step % every and info.step != info.total):
            return
        model, encoder, adapter = context["model"], context["text_encoder"], context["ip_adapter"]
        images = cached_image_encoder(context["image_encoder"])
        adapter.eval()
        rows = []
        try:
            for image, _ in items:
                file = IPAdapterFile(adapter, context["image_encoder"], context["out"])
                prompt = Prompted(file, images.embed(image_tensor(Image.fromarray(image))))
                s = Settings(prompt=text, steps=steps, cfg_scale=model.spec.default_cfg, n=seeds,
                             sampler=model.spec.default_sampler)
                with torch.no_grad():
                    out = to_uint8(txt2img(model, s, encoder, attachments=[prompt]))
                rows.append(np.concatenate([image[None], out]))
        finally:
            adapter.train()
        path = context["out"] / "samples" / f"step_{info.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid(np.concatenate(rows), rows=len(rows)).squeeze()).save(path)

    return hook

