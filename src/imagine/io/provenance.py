"""Provenance: an invisible watermark in the pixels, and signed records.

- The watermark is the one Stable Diffusion's scripts embed (SDXL's 48-bit message), by the DWT-DCT method of
  the ``invisible-watermark`` package (imwatermark), which does the work: the image's U and V chroma planes go
  through a Haar wavelet, and in each 4 x 4 block of the low band the largest coefficient is quantised (step 36)
  to carry one bit, the 48 bits repeated over the blocks. Detection reads the bits back by majority; an image
  is said to carry the mark when at least ``MATCH`` of the 48 agree (by chance: about 1 in 10^7). The method
  needs 256 x 256 pixels or more (the package's own floor: fewer blocks than that do not survive).
- A record can be signed (Ed25519, through ``cryptography``) with a key the user keeps: the signature covers the
  pixels, A1111's parameters text and the JSON record, so ``imagine info --verify`` tells an image whose claims
  about how it was made are intact from one changed after signing. The public key travels in the record; a
  signature proves who made the image only against a public key the verifier already trusts (``--public-key``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from imagine.io.png import FORMAT

# Stable Diffusion XL's watermark message (sgm/util.py's WATERMARK_MESSAGE), 48 bits
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS = [int(b) for b in bin(WATERMARK_MESSAGE)[2:]]
MATCH = 42  # of 48 bits: the mark is present
MIN_PIXELS = 256 * 256
METHOD = "dwtDct"
SIGNATURE_FORMAT = "imagine-signature-1"


def _bgr(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError("the watermark is written into RGB uint8 images")
    return np.ascontiguousarray(pixels[..., ::-1])


def can_watermark(width: int, height: int) -> bool:
    return width * height >= MIN_PIXELS


def add_watermark(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` (H, W, 3) uint8 RGB with Stable Diffusion's invisible watermark in them."""
    from imwatermark import WatermarkEncoder  # late: it imports OpenCV and torch, off the CLI's start-up path

    h, w = pixels.shape[:2]
    if not can_watermark(w, h):
        raise ValueError(f"the invisible watermark needs at least 256 x 256 pixels (the DWT-DCT method's blocks); "
                         f"this image is {w}x{h}: make it larger (--size, hires fix) or leave the watermark off")
    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", WATERMARK_BITS)
    return np.ascontiguousarray(encoder.encode(_bgr(pixels), METHOD)[..., ::-1])


def read_watermark(pixels: np.ndarray, method: str = METHOD) -> int | None:
    """How many of the 48 bits of Stable Diffusion's watermark ``pixels`` carry by ``method`` (dwtDct, what
    --watermark writes; dwtDctSvd, the package's JPEG-robust variant); None: too small to tell."""
    from imwatermark import WatermarkDecoder

    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    pixels = np.ascontiguousarray(pixels[..., :3]).astype(np.uint8, copy=False)
    if not can_watermark(pixels.shape[1], pixels.shape[0]):
        return None
    bits = WatermarkDecoder("bits", len(WATERMARK_BITS)).decode(_bgr(pixels), method)
    return int(sum(int(a) == b for a, b in zip(bits, WATERMARK_BITS, strict=True)))


def describe_watermark(pixels: np.ndarray) -> str:
    """One line for ``imagine info``: Stable Diffusion's mark by either of the package's DWT methods."""
    read = {method: read_watermark(pixels, method) for method in (METHOD, "dwtDctSvd")}
    if read[METHOD] is None:
        return "not checked (the image is smaller than 256 x 256 pixels)"
    for method, matched in read.items():
        if matched >= MATCH:
            return f"present: Stable Diffusion's invisible watermark ({method}, {matched}/48 bits)"
    return f"none found ({read[METHOD]}/48 bits of Stable Diffusion's mark, chance is about 24)"


# --- signed records ---------------------------------------------------------------------------------------

def _payload(pixels: np.ndarray, parameters: str | None, record: dict[str, Any]) -> bytes:
    """What a signature covers: the pixels (shape and bytes), the parameters text and the record (canonical JSON,
    without its signature)."""
    pixels = np.ascontiguousarray(pixels.squeeze(-1) if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels)
    image = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()
    text = hashlib.sha256((parameters or "").encode()).hexdigest()
    body = {k: v for k, v in record.items() if k != "signature"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "\n".join((SIGNATURE_FORMAT, image, text, canonical)).encode()


def load_signing_key(path: Path | str):
    """An Ed25519 private key from a PEM file (imagine keygen writes one); a clear error for anything else."""
    path = Path(path)
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ValueError(f"no signing key at {path}: make one with imagine keygen {path}") from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not an unencrypted PEM private key ({err}); imagine keygen writes one") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__.replace('PrivateKey', '')} key; records are signed "
                         "with Ed25519 keys (imagine keygen)")
    return key


def load_public_key(path: Path | str):
    path = Path(path)
    try:
        key = load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"no public key at {path}") from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def _raw(public_key) -> bytes:

    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def fingerprint(public_key) -> str:
    """A short name for a public key: the first 16 hex digits of the SHA-256 of its 32 bytes."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def write_keypair(path: Path | str) -> tuple[Path, Path]:
    """A new Ed25519 key: the private key at ``path`` (PEM, readable by the owner only, never over a file) and
    its public key beside it (.pub.pem)."""
    path = Path(path)
    public = path.with_name(path.name.removesuffix(".pem") + ".pub.pem")
    for p in (path, public):
        if p.exists():
            raise ValueError(f"{p} exists: imagine never writes over a key")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return path, public


def sign(pixels: np.ndarray, parameters: str, record: dict[str, Any], key) -> dict[str, Any]:
    """``record`` with its signature: {"algorithm": "ed25519", "public_key", "key_id", "value"} (base64)."""

    body = {"format": FORMAT, **{k: v for k, v in record.items() if k != "signature"}}
    value = key.sign(_payload(pixels, parameters, body))
    public = key.public_key()
    return {**record, "signature": {"algorithm": "ed25519", "format": SIGNATURE_FORMAT,
                                    "public_key": base64.b64encode(_raw(public)).decode(),
                                    "key_id": fingerprint(public), "value": base64.b64encode(value).decode()}}


def verify(pixels: np.ndarray, parameters: str | None, record: dict[str, Any] | None,
           trusted=None) -> tuple[bool, str]:
    """(valid, what to say) for an image read back: its signature checked against its pixels, text and record,
    and, with ``trusted`` (a public key), that it is that key's."""

    signature = (record or {}).get("signature")
    if not isinstance(signature, dict):
        return False, "not signed: the image carries no signature (imagine signs with --sign-key)"
    if signature.get("algorithm") != "ed25519" or signature.get("format") != SIGNATURE_FORMAT:
        return False, f"a signature of a kind this imagine does not check ({signature.get('algorithm')!r})"
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(signature["public_key"]))
        value = base64.b64decode(signature["value"])
    except (KeyError, ValueError, TypeError):
        return False, "INVALID: the signature is malformed"
    try:
        public.verify(value, _payload(pixels, parameters, record))
    except InvalidSignature:
        return False, ("INVALID: the pixels, the parameters or the record changed after signing (key "
                       f"{fingerprint(public)})")
    if trusted is not None and _raw(trusted) != _raw(public):
        return False, (f"INVALID for this key: signed by key {fingerprint(public)}, not by the trusted key "
                       f"{fingerprint(trusted)}")
    who = f"the trusted key {fingerprint(public)}" if trusted is not None else (
        f"key {fingerprint(public)} (the key in the record: pass --public-key to check it is one you trust)")
    return True, f"valid: pixels, parameters and record as signed by {who}"
