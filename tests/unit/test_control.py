"""Preprocessors on images with known answers, and the one attachment mechanism for spatial control:
composition, weights, step ranges, control modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.a1111 import a1111_field
from imagine.adapters.control import Conditioner, Controlled, ControlUnit, module_name
from imagine.data import conditions as C
from imagine.io.control_files import ControlFile
from imagine.models import ControlNetModel, T2IAdapter, T2IAdapterConfig, UNet2DConditionModel, UNetConfig


def _square(size=32, box=(8, 8, 20, 20), colour=(220, 40, 40), background=(0, 0, 0)):
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = background
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = colour
    return img


def test_canny_finds_the_square_outline_and_nothing_else():
    edges = C.canny(_square())[..., 0] > 0
    ys, xs = np.nonzero(edges)
    assert edges.sum() > 30
    assert xs.min() >= 6 and xs.max() <= 21 and ys.min() >= 6 and ys.max() <= 21  # on the square's border
    assert not edges[11:17, 11:17].any()  # not inside it
    # a flat image has no edges; a faint step (30 levels) is below A1111's default 100/200 thresholds
    assert not C.canny(np.full((16, 16, 3), 90, np.uint8)).any()
    assert not C.canny(_square(colour=(30, 30, 30))).any()
    assert C.canny(_square(colour=(30, 30, 30)), low=20, high=40).any()


def test_segmentation_fills_each_object_with_its_shape_class_colour():
    from imagine.data.shapes import make_scene, render

    seg = C.segmentation(_square())
    assert (seg[8:20, 8:20] == C.SEGMENT_COLORS["square"]).all()
    assert (seg[:8] == 0).all() and (seg[20:] == 0).all()
    for i in range(6):  # builtin:shapes scenes: each object's pixels take its own class's colour
        scene = make_scene(i)
        img, seg = render(scene, 64), C.segmentation(render(scene, 64))
        for obj in scene.objects:
            mask = np.asarray(Image.fromarray(obj.mask).resize((64, 64))) if obj.mask.shape != (64, 64) else obj.mask
            colours, counts = np.unique(seg[mask].reshape(-1, 3), axis=0, return_counts=True)
            assert tuple(colours[counts.argmax()]) == C.SEGMENT_COLORS[obj.shape], (i, obj.shape, scene.caption)
        assert img.shape == seg.shape


def test_scribble_keypoints_and_tile_on_known_inputs():
    img = _square()
    lines = C.scribble(img)[..., 0] > 0
    assert lines[8, 8:20].all() and lines[8:20, 8].all() and not lines[12:16, 12:16].any()
    dots = C.keypoints(img)[..., 0] > 0
    ys, xs = np.nonzero(dots)
    assert abs(ys.mean() - 13.5) < 0.6 and abs(xs.mean() - 13.5) < 0.6  # the centre
    assert dots.sum() < (12 * 12) / 2  # a disc smaller than the object
    flat = np.full((32, 32, 3), 77, np.uint8)
    assert (C.tile(flat) == 77).all()  # nothing to blur
    checker = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2)
    assert C.tile(checker, down=4).std() < 5  # detail gone, the mean kept
    assert abs(C.tile(checker, down=4).mean() - 127.5) < 2
    assert C.detect("canny", img, resolution=64).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="unknown; choose one of"):
        C.detect("depth", img)
    assert module_name("tile_resample") == "tile" and module_name("seg_ofade20k") == "segmentation"


def _tiny():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                           norm_num_groups=4, cross_attention_dim=6, attention_head_dim=2,
                                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))).eval()
    return unet


def _jittered_controlnet(unet, seed):
    net = ControlNetModel.from_unet(unet, latent_factor=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def test_units_compose_by_summing_and_respect_weight_range_and_mode():
    unet = _tiny()
    a, b = _jittered_controlnet(unet, 1), _jittered_controlnet(unet, 2)
    adapter = T2IAdapter(T2IAdapterConfig.for_unet(unet.config, latent_factor=2, num_res_blocks=1)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 3, 6)
    ca, cb, cc = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    units = [Conditioner(ControlFile(a, "controlnet", "canny", None, {}), ca, weight=0.7),
             Conditioner(ControlFile(b, "controlnet", "segmentation", None, {}), cb, weight=0.4),
             Conditioner(ControlFile(adapter, "t2i_adapter", "canny", None, {}), cc, weight=0.5)]
    timesteps = torch.tensor([900.0, 700.0, 500.0, 300.0, 100.0])  # five steps; t=500 is step 2: 40% done
    with torch.no_grad():
        got = Controlled(unet, units, timesteps)(x, t, encoder_hidden_states=ctx)
        da, ma = a(x, t, ctx, ca.expand(2, -1, -1, -1), conditioning_scale=0.7)
        db, mb = b(x, t, ctx, cb.expand(2, -1, -1, -1), conditioning_scale=0.4)
        feats = [f * 0.5 for f in adapter(cc)]
        expected = unet(x, t, ctx, down_block_additional_residuals=[p + q for p, q in zip(da, db, strict=True)],
                        mid_block_additional_residual=ma + mb, down_intrablock_additional_residuals=feats)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        base = unet(x, t, ctx)
        # weight 0, or a step outside [start, end], is the base model exactly
        off = [Conditioner(ControlFile(a, "controlnet", "canny", None, {}), ca, weight=0.0),
               Conditioner(ControlFile(b, "controlnet", "canny", None, {}), cb, start=0.0, end=0.2),
               Conditioner(ControlFile(adapter, "t2i_adapter", "canny", None, {}), cc, start=0.6, end=1.0)]
        assert torch.equal(Controlled(unet, off, timesteps)(x, t, encoder_hidden_states=ctx), base)
        # "ControlNet is more important": the unconditional row (0) gets no control, the conditional one does
        rows = torch.tensor([0.0, 1.0])
        control = [Conditioner(ControlFile(a, "controlnet", "canny", None, {}), ca, mode="control")]
        out = Controlled(unet, control, timesteps)(x, t, encoder_hidden_states=ctx, control_rows=rows)
        assert torch.equal(out[0], base[0]) and not torch.allclose(out[1], base[1])
        # "My prompt is more important": layer k of n scaled by 0.825 ** (n - 1 - k)
        prompt = Conditioner(ControlFile(a, "controlnet", "canny", None, {}), ca, mode="prompt")
        residuals = prompt.residuals(x, t, {"encoder_hidden_states": ctx}, None)
        down, mid = residuals["down_block_additional_residuals"], residuals["mid_block_additional_residual"]
        plain_down, plain_mid = a(x, t, ctx, ca.expand(2, -1, -1, -1))
        n = len(plain_down) + 1
        torch.testing.assert_close(down[0], plain_down[0] * 0.825 ** (n - 1))
        torch.testing.assert_close(mid, plain_mid)


def test_units_are_checked_and_recorded_as_the_a1111_extension_writes_them():
    img = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="start and end"):
        ControlUnit("canny", img, start=0.8, end=0.2).check()
    with pytest.raises(ValueError, match="control mode 'strong' unknown"):
        ControlUnit("canny", img, mode="strong").check()
    with pytest.raises(ValueError, match="resize mode"):
        ControlUnit("canny", img, resize_mode="stretch").check()
    unit = ControlUnit("canny", img, mode="ControlNet is more important", resize_mode="Just Resize").check()
    assert unit.mode == "control" and unit.resize_mode == "just_resize"
    text = a1111_field({"module": "canny", "model": "cn", "sha256_10": "0123456789", "weight": 0.5,
                        "resize_mode": "crop_and_resize", "processor_res": 64, "threshold_a": 100.0,
                        "threshold_b": 200.0, "start": 0.0, "end": 0.8, "pixel_perfect": False, "mode": "prompt"})
    assert text == ("Module: canny, Model: cn [0123456789], Weight: 0.5, Resize Mode: Crop and Resize, Processor "
                    "Res: 64, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 0.8, Pixel "
                    "Perfect: False, Control Mode: My prompt is more important")
