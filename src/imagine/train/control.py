"""Training spatial control on a frozen model: a ControlNet (Zhang et al. 2023) or a T2I-Adapter (Mou et al. 2023).

The base model never changes. Each training image's condition is computed on the fly by the same
preprocessor users run (data/conditions.py), the network turns it into residuals for the UNet, and only
the network learns, with the model's own diffusion loss (train/lora.py's ``fit``: per-sample randomness,
exact resume, atomic checkpoints). Prompts are emptied with probability 0.5 by default, as the ControlNet
paper does, so the network learns to read the condition alone and classifier-free guidance still works.
A fresh ControlNet is the base model exactly (its zero convolutions start at zero)."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagine.adapters.control import Conditioner, condition_tensor
from imagine.data.conditions import check_module, detect
from imagine.data.images import load_dataset
from imagine.data.shapes import ShapesDataset
from imagine.io.control_files import ControlFile
from imagine.io.networks import save_diffusers_model
from imagine.models import ControlNetModel, T2IAdapter, T2IAdapterConfig
from imagine.models.mmdit import SD3ControlNetModel
from imagine.pipelines.generate import txt2img
from imagine.pipelines.settings import Settings
from imagine.pipelines.unconditional import grid, to_uint8
from imagine.train.loop import Hook
from imagine.train.lora import AdapterTrainConfig, base_record, checkpoint_dir, fit

CLASS_NAMES = {"controlnet": "ControlNetModel", "t2i_adapter": "T2IAdapter"}
# a ControlNet for an MMDiT is the transformer kind (SD3ControlNetModel: the first blocks copied)
TRANSFORMER_CLASS_NAMES = {"mmdit": "SD3ControlNetModel"}


@dataclass(frozen=True)
class ControlTrainConfig(AdapterTrainConfig):
    condition: str = "canny"  # the preprocessor whose maps the network learns to read
    kind: str = "controlnet"  # or t2i_adapter
    caption_dropout: float = 0.5  # the paper's 50% empty prompts
    num_res_blocks: int = 2  # T2I-Adapter: residual blocks per level

    def __post_init__(self):
        super().__post_init__()
        check_module(self.condition)
        if self.condition == "none":
            raise ValueError("a control model learns a condition: pick canny, scribble, segmentation, keypoints "
                             "or tile")
        if self.kind not in CLASS_NAMES:
            raise ValueError(f"kind {self.kind!r} unknown; choose controlnet or t2i_adapter")


def conditions(images: torch.Tensor, module: str) -> torch.Tensor:
    """The preprocessor's maps of a batch: (B, C, H, W) in [-1, 1] -> (B, 3, H, W) in [0, 1]."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    maps = np.stack([detect(module, img) for img in pixels]).astype(np.float32) / 255.0
    return torch.from_numpy(maps).permute(0, 3, 1, 2).contiguous()


def new_network(model, kind: str, seed: int = 0, num_res_blocks: int = 2) -> torch.nn.Module:
    """A fresh ControlNet (the UNet's encoder copied, zero convolutions at zero; for an MMDiT, its first half of
    blocks copied, zero linear outputs: PixArt-delta's and SD3's design) or T2I-Adapter for ``model``."""
    torch.manual_seed(seed)  # the condition embedding's (and the adapter's) random start
    network = model.family.network
    if network != "unet":
        if kind != "controlnet" or network not in TRANSFORMER_CLASS_NAMES:
            raise ValueError(f"a {model.family.label} model takes no {kind.replace('_', '-')} of imagine's making; "
                             f"control models are trained for UNets and MMDiTs (as ControlNets)")
        return SD3ControlNetModel.from_transformer(model.unet).float()
    if kind == "controlnet":
        return ControlNetModel.from_unet(model.unet, model.latent_factor).float()
    return T2IAdapter(T2IAdapterConfig.for_unet(model.unet.config, model.latent_factor, num_res_blocks))


def train_control(model, text_encoder, data, cfg: ControlTrainConfig, out: Path | str, *, resume: bool = False,
                  hooks: tuple[Hook, ...] = (), device: str | torch.device = "cpu") -> Path:
    """Train a control network for ``model`` on ``data`` (captioned images at the model's size) and write it
    to the folder ``out`` in diffusers' layout (it loads in diffusers too). Checkpoints, the log and sample
    grids (condition | outputs) go to OUT-training/ beside it."""
    out = Path(out)
    if model.spec.text_encoder is None or text_encoder is None:
        raise ValueError("control training needs a text-to-image model and its text encoder")
    if out.exists() and not resume:
        raise ValueError(f"{out} exists; choose a new --out (or --resume the run that writes it)")
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    model.unet.requires_grad_(False)
    net = new_network(model, cfg.kind, cfg.seed, cfg.num_res_blocks).requires_grad_(True).train()
    params = {f"net.{k}": p for k, p in net.named_parameters()}

    transformer = model.family.network != "unet"

    def control(images, x_t, t, cond, indices=None):
        maps = conditions(images, cfg.condition).to(x_t.device)  # preprocessors run on the CPU
        if transformer:  # the MMDiT's ControlNet reads the condition's latents
            with torch.no_grad():
                latents = model.vae.to_latent(model.vae.encode(maps * 2 - 1).mean) if model.vae is not None \
                    else maps * 2 - 1
            return {"block_controlnet_hidden_states": net(x_t, t, cond["encoder_hidden_states"],
                                                          cond["pooled_projections"], latents.to(x_t.dtype),
                                                          encoder_attention_mask=cond.get("encoder_attention_mask"))}
        if cfg.kind == "t2i_adapter":
            return {"down_intrablock_additional_residuals": net(maps)}
        extra = {k: cond[k] for k in ("encoder_attention_mask", "text_embeds", "time_ids") if k in cond}
        down, mid = net(x_t, t, cond["encoder_hidden_states"], maps, **extra)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    fit(model, text_encoder, data, cfg, root, params, text_grad=False, resume=resume, hooks=hooks,
        must_match={"condition": cfg.condition, "kind": cfg.kind}, control=control,
        context={"control": net, "condition": cfg.condition, "kind": cfg.kind}, device=device, modules=(net,))
    net.eval().requires_grad_(False)
    if out.exists():  # a resumed run finishing again: the new weights replace the old folder
        shutil.rmtree(out)
    info = {"condition": cfg.condition, "kind": cfg.kind, "training": asdict(cfg), **base_record(model)}
    name = TRANSFORMER_CLASS_NAMES.get(model.family.network) or CLASS_NAMES[cfg.kind]
    return save_diffusers_model(net, out, name, info)


def control_sample_hook(items: list[tuple[np.ndarray, str]], every: int, steps: int = 20, seeds: int = 3):
    """Every ``every`` steps (and at the last): one row per held-out item: its condition, then the
    network's output for its caption at ``seeds`` seeds, under OUT-training/samples/."""
    def hook(info, context):
        if info is None or not every or not items or (info.step % every and info.step != info.total):
            return
        model, encoder, net = context["model"], context["text_encoder"], context["control"]
        net.eval()
        rows = []
        try:
            for image, caption in items:
                condition = Image.fromarray(detect(context["condition"], image))
                file = ControlFile(net, context["kind"], context["condition"], context["out"], {},
                                   model.family.network)
                unit = Conditioner(file, condition_tensor(condition))
                s = Settings(prompt=caption, steps=steps, cfg_scale=model.spec.default_cfg, n=seeds,
                             sampler=model.spec.default_sampler)
                with torch.no_grad():
                    out = to_uint8(txt2img(model, s, encoder, attachments=[unit]))
                rows.append(np.concatenate([np.asarray(condition)[None], out]))
        finally:
            net.train()
        path = context["out"] / "samples" / f"step_{info.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid(np.concatenate(rows), rows=len(rows)).squeeze()).save(path)
        path.with_suffix(".txt").write_text("\n".join(c for _, c in items) + "\n")

    return hook


def held_out_items(data: str, size: int, count: int = 3) -> list[tuple[np.ndarray, str]]:
    """Scenes the training never draws, for sample grids: builtin:shapes under another seed; for a folder,
    its first images (there is nothing held out of a user's folder)."""
    if data.startswith("builtin:shapes"):
        shapes = ShapesDataset(size=size, seed=7919)
        return [(img, scene.caption) for scene, img in (shapes.scene(i) for i in range(count))]

    dataset = load_dataset(data, size, 3, captions=True)
    images, _, captions = dataset.batch(list(range(min(count, len(dataset)))))
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return list(zip(pixels, captions, strict=True))
