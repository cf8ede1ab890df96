"""PNG metadata in A1111's format and ours: write, read, parse."""

from __future__ import annotations

import numpy as np
from PIL import Image, PngImagePlugin

from imagine.io.png import a1111_parameters, free_path, parse_a1111, read_png_metadata, save_png

A1111_SAMPLE = (
    "masterpiece, a (red:1.2) fox, forest\n"
    "Negative prompt: blurry, lowres\n"
    'Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, '
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "fox: 3f2a1b, forest: 9c8d7e", '
    "Version: v1.10.1"
)


def test_parse_a1111_text():
    p = parse_a1111(A1111_SAMPLE)
    assert p["Prompt"] == "masterpiece, a (red:1.2) fox, forest"
    assert p["Negative prompt"] == "blurry, lowres"
    assert p["Steps"] == "30" and p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras"
    assert p["Size"] == "512x768" and p["Seed"] == "1234" and p["Model hash"] == "6ce0161689"
    assert p["Lora hashes"] == "fox: 3f2a1b, forest: 9c8d7e"  # a quoted value with commas
    assert p["Version"] == "v1.10.1"


def test_our_parameters_parse_back():
    text = a1111_parameters("a red circle, big", "blurry", {"Steps": 20, "Sampler": "Euler a", "CFG scale": "7",
                                                              "Seed": 5, "Size": "64x64", "Odd": "x: y, z"})
    p = parse_a1111(text)
    assert p["Prompt"] == "a red circle, big" and p["Negative prompt"] == "blurry"
    assert p["Sampler"] == "Euler a" and p["Seed"] == "5" and p["Odd"] == "x: y, z"
    assert parse_a1111(a1111_parameters("p", "", {"Steps": 1}))["Negative prompt"] == ""


def test_png_round_trip_and_a1111_images(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    path = save_png(tmp_path / "x.png", pixels, "p\nSteps: 1", {"settings": {"seed": 3}})
    text, record = read_png_metadata(path)
    assert text == "p\nSteps: 1" and record["settings"]["seed"] == 3 and record["format"] == "imagine/1"
    assert np.array_equal(np.asarray(Image.open(path)), pixels)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_SAMPLE)
    Image.fromarray(pixels).save(tmp_path / "a1111.png", pnginfo=info)
    text, record = read_png_metadata(tmp_path / "a1111.png")
    assert text == A1111_SAMPLE and record is None


def test_free_path_never_overwrites(tmp_path):
    first = free_path(tmp_path, "img")
    first.write_bytes(b"x")
    second = free_path(tmp_path, "img")
    assert first.name == "img.png" and second.name == "img-1.png"
