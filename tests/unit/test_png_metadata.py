"""PNG metadata in A1111's format and ours: write, read, parse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from imagine.a1111 import a1111_parameters, parse_a1111
from imagine.io.png import file_hash, read_png_metadata, save_png, write_new

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
    path = save_png(tmp_path, "x", pixels, "p\nSteps: 1", {"settings": {"seed": 3}})
    assert path == tmp_path / "x.png"
    text, record = read_png_metadata(path)
    assert text == "p\nSteps: 1" and record["settings"]["seed"] == 3 and record["format"] == "imagine/1"
    assert np.array_equal(np.asarray(Image.open(path)), pixels)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_SAMPLE)
    Image.fromarray(pixels).save(tmp_path / "a1111.png", pnginfo=info)
    text, record = read_png_metadata(tmp_path / "a1111.png")
    assert text == A1111_SAMPLE and record is None


def test_write_new_never_overwrites_and_leaves_no_partial_files(tmp_path):
    first = write_new(tmp_path, "img", b"first")
    second = write_new(tmp_path, "img", b"second")
    assert (first.name, second.name) == ("img.png", "img-1.png")
    assert first.read_bytes() == b"first" and second.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png", "img.png"]  # no temporary left behind


def _writer(folder: str, tag: str, count: int, start) -> None:
    start.wait()
    for i in range(count):
        write_new(Path(folder), "race", f"{tag}-{i}".encode() * 1000)


def test_two_processes_writing_one_name_never_clobber_each_other(tmp_path):
    """Two processes claim the same names at the same moment: every write lands in a file of its own."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), tag, 40, start)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    files = sorted(tmp_path.glob("race*.png"))
    contents = sorted(f.read_bytes() for f in files)
    expected = sorted(f"{tag}-{i}".encode() * 1000 for tag in ("a", "b") for i in range(40))
    assert len(files) == 80 and contents == expected  # none lost, none overwritten, none torn


def test_file_hash_is_computed_once_per_file_version(tmp_path, monkeypatch):
    import hashlib
    import os

    import imagine.io.png as png

    calls = []
    real = hashlib.sha256

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr(png.hashlib, "sha256", counting)
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"weights")
    assert file_hash(f) == real(b"weights").hexdigest()[:10]
    assert file_hash(f, 64) == real(b"weights").hexdigest() and len(calls) == 1  # cached
    f.write_bytes(b"other weights")
    os.utime(f, ns=(1, 1))
    assert file_hash(f) == real(b"other weights").hexdigest()[:10] and len(calls) == 2  # changed file: again
