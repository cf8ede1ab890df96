"""Image transforms shared by generation and control: how an image meets an output size (A1111's resize modes)."""

from __future__ import annotations

from typing import Literal, get_args

from PIL import Image

# How an init image (and its mask) becomes the output size: A1111's resize modes 0 to 3, in order.
ResizeMode = Literal["just_resize", "crop_and_resize", "resize_and_fill", "latent_upscale"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)


def fit_image(image: Image.Image, size: tuple[int, int], mode: ResizeMode) -> Image.Image:
    """An init image (or its mask) brought to ``size`` = (width, height) as A1111's resize modes do:
    just_resize stretches; crop_and_resize scales to cover and crops the centre; resize_and_fill scales
    to fit inside and fills the borders by stretching the image's edge rows or columns outwards;
    latent_upscale stretches here (the latent is what gets resized, see img2img)."""
    w, h = size
    if image.size == size:
        return image
    if mode in ("just_resize", "latent_upscale"):
        return image.resize(size, Image.LANCZOS)
    iw, ih = image.size
    if mode == "crop_and_resize":
        scale = max(w / iw, h / ih)
        sw, sh = max(w, round(iw * scale)), max(h, round(ih * scale))
        resized = image.resize((sw, sh), Image.LANCZOS)
        left, top = (sw - w) // 2, (sh - h) // 2
        return resized.crop((left, top, left + w, top + h))
    scale = min(w / iw, h / ih)  # resize_and_fill
    sw, sh = max(1, min(w, round(iw * scale))), max(1, min(h, round(ih * scale)))
    resized = image.resize((sw, sh), Image.LANCZOS)
    out = Image.new(image.mode, size)
    left, top = (w - sw) // 2, (h - sh) // 2
    out.paste(resized, (left, top))
    if top > 0:  # fill above and below with the first and last rows, stretched
        out.paste(resized.crop((0, 0, sw, 1)).resize((sw, top)), (left, 0))
        out.paste(resized.crop((0, sh - 1, sw, sh)).resize((sw, h - top - sh)), (left, top + sh))
    if left > 0:
        out.paste(resized.crop((0, 0, 1, sh)).resize((left, sh)), (0, top))
        out.paste(resized.crop((sw - 1, 0, sw, sh)).resize((w - left - sw, sh)), (left + sw, top))
    return out
