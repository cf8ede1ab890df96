"""Training hooks the library offers: the loop calls hook(StepInfo, context) after each step (see
train/loop.py); a caller may call hook(None, {}) when training ends, which these ignore."""

from __future__ import annotations

import torch
from PIL import Image

from imagine.diffusion.superres import degrade, upsample
from imagine.io.model_folder import DiffusionModel
from imagine.io.networks import load_vae
from imagine.pipelines.generate import txt2img
from imagine.pipelines.settings import Settings
from imagine.pipelines.unconditional import generate, grid, to_uint8
from imagine.pipelines.upscale import sr_stage


def sample_grid_hook():
    """Every sample_every steps (and at the last): a grid from the EMA weights under out/samples/ (rows:
    classes, or one prompt per row for text-to-image models, listed beside it in a .txt)."""
    state: dict = {}

    def hook(info, context):
        cfg = context["config"]
        if info is None or not cfg.sample_every or (info.step % cfg.sample_every and info.step != info.total):
            return
        spec = context["spec"]
        vae = None
        if spec.latent:
            vae = state.setdefault("vae", load_vae(context["vae_dir"]))
        model = DiffusionModel(context["ema"].model, vae, spec, context["out"])
        path = context["out"] / "samples" / f"step_{info.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if spec.upscale > 1:
            _sr_grid(model, context, path)
            return
        if spec.text_encoder is not None:
            prompts = context["sample_prompts"]
            encoder = context["text_encoder"]
            images = torch.cat([txt2img(model, Settings(prompt=p, steps=20, cfg_scale=5.0, n=4), encoder)
                                for p in prompts])
            Image.fromarray(grid(to_uint8(images), rows=len(prompts)).squeeze()).save(path)
            path.with_suffix(".txt").write_text("\n".join(prompts) + "\n")
            return
        classes = list(range(len(spec.class_names))) or [None]
        cols = 8 if len(classes) > 1 else 32
        rows = []
        for c in classes:
            cfg_scale = 3.0 if c is not None and cfg.label_dropout > 0 else 1.0
            rows.append(generate(model, list(range(cols)), steps=20, sampler="dpmpp_2m", class_label=c, cfg=cfg_scale))
        images = to_uint8(torch.cat(rows))
        Image.fromarray(grid(images, rows=len(classes) if len(classes) > 1 else 4).squeeze()).save(path)

    return hook


def _sr_grid(model, context, path) -> None:
    """A super-resolution stage's samples: for four images the stage did not train on (scenes far past the
    training stream of builtin:shapes; a folder's first images), one row each of the low-resolution input
    (upsampled bilinearly), the stage's output and the truth. The prompts go beside it in a .txt."""
    data, spec = context["data"], model.spec
    first = 10**8 if getattr(data, "infinite", False) else 0
    indices = [first + i for i in range(min(4, len(data)))]
    truth, _, captions = data.batch(indices)
    captions = captions or [""] * len(indices)
    low = degrade(truth, spec.upscale)
    outs = [sr_stage(model, low[i: i + 1], Settings(prompt=captions[i], steps=20, cfg_scale=spec.default_cfg, seed=i),
                     context["text_encoder"]) for i in range(len(indices))]
    rows = [torch.cat([upsample(low[i: i + 1], tuple(truth.shape[-2:])), outs[i], truth[i: i + 1]])
            for i in range(len(indices))]
    Image.fromarray(grid(to_uint8(torch.cat(rows)), rows=len(indices)).squeeze()).save(path)
    path.with_suffix(".txt").write_text("columns: input (bilinear) | output | truth\n" + "\n".join(captions) + "\n")
