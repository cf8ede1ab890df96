"""Does the invisible watermark survive what happens to images, and what does it cost? Stable Diffusion's
48-bit message written by invisible-watermark's DWT-DCT method (what imagine's --watermark writes, as the SD
scripts do) into scikit-image's sample photographs at 512 x 512, then: saved as JPEG at quality 90 and 75,
resized to half, and cropped by 10% (5% off each side). *bits*: how many of the 48 the decoder reads back (about
24 by chance); *found*: at least 42 (imagine info's threshold). *PSNR*: the watermarked image against the
original. The package's DWT-DCT-SVD method, with the same message, is measured beside it.

    python benchmarks/provenance_eval.py    # writes docs/benchmarks/provenance_eval.{json,md}
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from imagine.io.provenance import MATCH, WATERMARK_BITS

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "cat", "colorwheel", "motorcycle_left")


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


ATTACKS = {
    "none": lambda x: x,
    "JPEG 90": lambda x: _jpeg(x, 90),
    "JPEG 75": lambda x: _jpeg(x, 75),
    "resize 0.5": lambda x: np.asarray(Image.fromarray(x).resize((x.shape[1] // 2, x.shape[0] // 2), Image.BICUBIC)),
    "crop 10%": lambda x: x[x.shape[0] // 20: -(x.shape[0] // 20), x.shape[1] // 20: -(x.shape[1] // 20)],
}


def photos(size: int = 512) -> list[np.ndarray]:
    out = []
    for name in PHOTOS:
        if not hasattr(data, name):
            continue
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = img[..., :3]
        if img.dtype != np.uint8:
            img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.max() <= 1 else img.astype(np.uint8)
        out.append(np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS)))
    return out


def main() -> None:
    from imwatermark import WatermarkDecoder, WatermarkEncoder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    images = photos()
    rows = []
    for method in ("dwtDct", "dwtDctSvd"):
        encoder = WatermarkEncoder()
        encoder.set_watermark("bits", WATERMARK_BITS)
        decoder = WatermarkDecoder("bits", len(WATERMARK_BITS))

        def bits(x: np.ndarray, decoder=decoder, method=method) -> int:
            read = decoder.decode(np.ascontiguousarray(x[..., ::-1]), method)
            return sum(int(a) == b for a, b in zip(read, WATERMARK_BITS, strict=True))

        marked = [np.ascontiguousarray(encoder.encode(np.ascontiguousarray(x[..., ::-1]), method)[..., ::-1])
                  for x in images]
        cost = [10 * np.log10(255**2 / ((m.astype(float) - x) ** 2).mean())
                for m, x in zip(marked, images, strict=True)]
        for attack, fn in ATTACKS.items():
            read = [bits(fn(m)) for m in marked]
            clean = [bits(fn(x)) for x in images]
            rows.append({"method": method, "attack": attack, "bits": float(np.mean(read)),
                         "found": float(np.mean([b >= MATCH for b in read])),
                         "false_alarms": float(np.mean([b >= MATCH for b in clean])), "psnr": float(np.mean(cost))})
            print(f"{method} {attack}: bits {np.mean(read):.1f}, found {rows[-1]['found']:.2f}", flush=True)
    report = {"images": len(images), "size": 512, "rows": rows, "threshold": MATCH}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "provenance_eval.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (args.out / "provenance_eval.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def markdown(r: dict) -> list[str]:
    md = ["# Does the invisible watermark survive?", "",
          f"`python benchmarks/provenance_eval.py`: {r['images']} of scikit-image's sample photographs at "
          f"{r['size']} x {r['size']}, Stable Diffusion's 48-bit message. *bits*: read back (24 by chance); "
          f"*found*: at least {r['threshold']} of 48; *false alarms*: the unmarked image, treated the same, found "
          "anyway.", "", "| method | after | bits | found | false alarms | PSNR of the mark (dB) |",
          "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        md.append(f"| {row['method']} | {row['attack']} | {row['bits']:.1f} | {row['found']:.2f} | "
                  f"{row['false_alarms']:.2f} | {row['psnr']:.1f} |")
    md += ["", "DWT-DCT (Stable Diffusion's method, what `--watermark` writes so that SD's own detectors agree) "
           "survives lossless saving only: a JPEG at quality 90 already erases it, as do resizing and cropping "
           "(the 4 x 4 blocks of the wavelet band no longer line up). The package's DWT-DCT-SVD method survives "
           "JPEG at 90 and 75 at the same cost in PSNR, and neither survives a resize or a crop: a mark that must "
           "outlive those needs a learned watermark (the package's RivaGAN, or Stable Signature's fine-tuned "
           "decoder), which is where this should go next. The signed record (`--sign-key`, `imagine info "
           "--verify`) is the other half: it proves the metadata intact, and is lost with the metadata."]
    return md


if __name__ == "__main__":
    main()
