"""Provenance through the doors (issue 37): --watermark and --sign-key on the CLI, imagine info finding the mark
and --verify checking the signature (exit 1 once anything changed), --from redoing a watermarked image; the
server's --watermark and --sign-key options on every image, and PNG info reporting both."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, PngImagePlugin

from imagine.io.png import read_png_metadata
from tests.e2e.inprocess import imagine


def test_watermark_and_signature_through_the_cli(tiny_t2i_dir, tmp_path):
    keys = imagine("keygen", tmp_path / "me.pem")
    assert keys.returncode == 0 and "key id" in keys.stdout, keys.stderr
    # 256 px, the mark's floor, in 128 px tiles: the tiny model's full-resolution attention is what costs here
    run = imagine("generate", "a red circle", "--model", tiny_t2i_dir, "--steps", 1, "--cfg", 1, "--width", 256,
                  "--height", 256, "--tile", 128, "--watermark", "--sign-key", tmp_path / "me.pem",
                  "--out", tmp_path / "o")
    assert run.returncode == 0, run.stderr[-2000:]
    png = run.stdout.split()[-1]
    text, record = read_png_metadata(png)
    assert "Watermark: invisible-watermark dwtDct" in text and record["settings"]["watermark"]
    assert record["signature"]["algorithm"] == "ed25519"
    info = imagine("info", png, "--verify", "--public-key", tmp_path / "me.pub.pem")
    assert info.returncode == 0, info.stdout + info.stderr
    assert "invisible watermark: present" in info.stdout and "signature: valid" in info.stdout
    # the same pixels under other parameters text: the signature no longer holds
    image = Image.open(png)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text.replace("a red circle", "a blue circle"))
    meta.add_text("imagine", image.info["imagine"])
    image.save(tmp_path / "edited.png", pnginfo=meta)
    bad = imagine("info", tmp_path / "edited.png", "--verify")
    assert bad.returncode == 1 and "INVALID" in bad.stdout
    again = imagine("generate", "--from", png, "--out", tmp_path / "again")  # no key given: the same pixels, unsigned
    assert again.returncode == 0, again.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(again.stdout.split()[-1])), np.asarray(Image.open(png)))
    assert "signature" not in read_png_metadata(again.stdout.split()[-1])[1]
    small = imagine("generate", "a red circle", "--model", tiny_t2i_dir, "--steps", 2, "--watermark",
                    "--out", tmp_path / "o")
    assert small.returncode != 0 and "at least 256 x 256 pixels" in small.stderr


def test_the_server_watermarks_and_signs_every_image(tiny_t2i_dir, tmp_path):
    from fastapi.testclient import TestClient

    from imagine.io.provenance import load_signing_key, write_keypair
    from imagine.server import Limits, create_app

    private, _ = write_keypair(tmp_path / "server.pem")
    app = create_app([tiny_t2i_dir], out_dir=None, limits=Limits(max_pixels=256 * 256), watermark=True,
                     sign_key=load_signing_key(private))
    with TestClient(app) as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1, "cfg_scale": 1, "width": 256,
                                                   "height": 256, "override_settings": {"imagine_tile": 128}})
        assert r.status_code == 200, r.text
        image = r.json()["images"][0]
        _, record = read_png_metadata(base64.b64decode(image))
        assert record["settings"]["watermark"] and record["signature"]["key_id"]
        items = client.post("/sdapi/v1/png-info", json={"image": image}).json()["items"]
        assert items["imagine_watermark"].startswith("present") and items["imagine_signature"].startswith("valid")
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2})  # 16 px: too small
        assert r.status_code == 422 and "at least 256 x 256" in r.text
        assert Image.open(io.BytesIO(base64.b64decode(image))).size == (256, 256)
