"""Provenance (issue 37): Stable Diffusion's invisible watermark written and found (through the
invisible-watermark package, as SD's scripts), refused on images too small to carry it; Ed25519-signed records
that hold until a pixel, the parameters or the record change, checked against a trusted key."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from imagine.io import provenance as pv


def _photo(size: int = 256) -> np.ndarray:
    return np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.LANCZOS))


def test_the_watermark_is_written_found_and_costs_little():
    photo = _photo()
    marked = pv.add_watermark(photo)
    assert marked.shape == photo.shape and marked.dtype == np.uint8
    assert pv.read_watermark(marked) >= pv.MATCH > pv.read_watermark(photo)
    assert "present" in pv.describe_watermark(marked) and "none found" in pv.describe_watermark(photo)
    psnr = 10 * np.log10(255**2 / ((marked.astype(float) - photo) ** 2).mean())
    assert psnr > 34
    # SD's own decoder (the package's, on BGR as their scripts call it) reads SD's message
    from imwatermark import WatermarkDecoder

    bits = WatermarkDecoder("bits", 48).decode(np.ascontiguousarray(marked[..., ::-1]), "dwtDct")
    assert sum(int(a) == b for a, b in zip(bits, pv.WATERMARK_BITS, strict=True)) >= pv.MATCH
    assert int("".join(str(b) for b in pv.WATERMARK_BITS), 2) == 0b101100111110110010010000011110111011000110011110


def test_small_images_are_refused_and_not_judged():
    with pytest.raises(ValueError, match=r"at least 256 x 256 pixels.*64x64"):
        pv.add_watermark(_photo(64))
    assert pv.read_watermark(_photo(64)) is None and "not checked" in pv.describe_watermark(_photo(64))


def test_a_signed_record_holds_until_anything_changes(tmp_path):
    private, public = pv.write_keypair(tmp_path / "me.pem")
    assert public.name == "me.pub.pem" and (private.stat().st_mode & 0o777) == 0o600
    with pytest.raises(ValueError, match="never writes over a key"):
        pv.write_keypair(tmp_path / "me.pem")
    key, trusted = pv.load_signing_key(private), pv.load_public_key(public)
    pixels = _photo(32)
    record = {"kind": "txt2img", "settings": {"seed": 1, "cfg_scale": 7.5}, "format": "imagine-1"}
    signed = pv.sign(pixels, "a cat\nSteps: 20", {k: v for k, v in record.items() if k != "format"}, key)
    read_back = {**signed, "format": record["format"]}
    from imagine.io.png import FORMAT

    read_back["format"] = FORMAT  # as the PNG writes it
    assert pv.verify(pixels, "a cat\nSteps: 20", read_back, trusted)[0]
    tampered = pixels.copy()
    tampered[0, 0, 0] ^= 1
    assert "INVALID" in pv.verify(tampered, "a cat\nSteps: 20", read_back)[1]
    assert not pv.verify(pixels, "a dog\nSteps: 20", read_back)[0]
    changed = {**read_back, "settings": {"seed": 2, "cfg_scale": 7.5}}
    assert not pv.verify(pixels, "a cat\nSteps: 20", changed)[0]
    other = pv.load_public_key(pv.write_keypair(tmp_path / "other.pem")[1])
    valid, said = pv.verify(pixels, "a cat\nSteps: 20", read_back, other)
    assert not valid and "not by the trusted key" in said
    assert "not signed" in pv.verify(pixels, "x", {"kind": "txt2img"})[1]
    (tmp_path / "rsa.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        pv.load_signing_key(tmp_path / "rsa.pem")
