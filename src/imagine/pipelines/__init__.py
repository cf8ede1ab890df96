"""Inference: txt2img, img2img, inpaint, upscale, as short explicit loops over one request."""
