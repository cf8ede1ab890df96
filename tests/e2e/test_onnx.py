"""ONNX export and the onnxruntime backends on a tiny model: parity with eager torch, batch invariance, the
backend recorded and reproduced by --from, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")

from imagine.io.png import read_png_metadata

from .test_control import imagine


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.mark.slow  # over 10 s here: `pytest -m slow` runs it (CI's suite stays under 10 minutes)
def test_export_matches_eager_torch_and_stays_batch_invariant(tiny_t2i_dir, cache, monkeypatch):
    from imagine.io.onnx import default_onnx_folder, export_onnx, load_onnx
    from imagine.pipelines.generate import Settings, txt2img
    from imagine.pipelines.request import load_text_model

    monkeypatch.setenv("IMAGINE_CACHE", str(cache))
    model, encoder = load_text_model(tiny_t2i_dir)
    folder = export_onnx(model, encoder, default_onnx_folder(model))
    manifest = json.loads((folder / "onnx.json").read_text())
    assert set(manifest["files"]) == {"unet.onnx", "vae_decoder.onnx", "text_encoder.onnx", "unet.int8.onnx"}
    sessions = load_onnx(folder, model)
    g = torch.Generator().manual_seed(0)
    text = encoder.encode(["a red circle", "", "a blue square"])
    x = torch.randn(3, model.unet.config.in_channels, 6, 4, generator=g)  # not the export's size, odd batch
    cond = {"encoder_hidden_states": text.context, "encoder_attention_mask": text.mask}
    with torch.no_grad():
        ref = model.unet(x, torch.tensor([3.0, 400.0, 999.0]), **cond)
        assert (sessions.unet(x, torch.tensor([3.0, 400.0, 999.0]), **cond) - ref).abs().max() < 1e-3
        z = torch.randn(3, model.vae.config.latent_channels, 4, 4, generator=g)
        assert (sessions.vae.decode(z) - model.vae.decode(z)).abs().max() < 1e-3
        ids = torch.tensor([[101, 1037, 2417, 102]])
        ours = sessions.text(ids, torch.ones_like(ids)).last_hidden_state
        assert (ours - encoder.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
                ).abs().max() < 1e-3
    s = Settings(prompt="a red circle", negative_prompt="green", steps=3, cfg_scale=4.0, seed=3, n=3)
    eager = txt2img(model, s, encoder)
    for backend, tol in (("onnxruntime", 1e-3), ("onnxruntime-int8", None)):
        b = Settings(**{**s.to_dict(), "backend": backend})
        batch = txt2img(model, b, encoder)
        if tol is not None:
            assert (batch - eager).abs().max() < tol
        for i in (0, 2):
            alone = txt2img(model, Settings(**{**b.to_dict(), "n": 1, "seed": 3 + i}), encoder)
            assert torch.equal(batch[i], alone[0]), f"{backend}: image {i} of 3 differs from seed {3 + i} alone"
    other = model.__class__(model.unet, model.vae, model.spec, model.path, hash_file=tiny_t2i_dir / "diffusion.json")
    with pytest.raises(Exception, match="exported from another model"):
        load_onnx(folder, other)


def test_backend_is_recorded_and_reproduced(tiny_t2i_dir, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGINE_CACHE", str(cache))
    common = ["--model", tiny_t2i_dir, "--steps", 3, "--width", 16, "--height", 16, "--seed", 5]
    run = imagine("generate", "a red circle", *common, "--backend", "onnxruntime-int8", "--out", "a", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "a" / "000005-txt2img.png"
    _, record = read_png_metadata(out)
    assert record["settings"]["backend"] == "onnxruntime-int8"
    run = imagine("generate", "--from", out, "--out", "b", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "000005-txt2img.png")), np.asarray(Image.open(out)))
    # the ONNX text encoder runs without transformers: a fresh process never imports it (a second of cold start)
    code = ("import sys; from imagine.cli import main; sys.argv = ['imagine', 'generate', 'a blue star', "
            f"'--model', {str(tiny_t2i_dir)!r}, '--steps', '2', '--width', '16', '--height', '16', '--seed', '0', "
            "'--backend', 'onnxruntime', '--out', 'd']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "IMAGINE_CACHE": str(cache)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "d" / "000000-txt2img.png").exists()
    run = imagine("generate", "x", *common, "--backend", "onnxruntime", "--precision", "bf16", "--out", "c",
                  cwd=tmp_path)
    assert run.returncode != 0 and "bf16 autocast and --compile are torch's" in run.stderr
    run = imagine("generate", "x", *common, "--backend", "tensorrt", "--out", "c", cwd=tmp_path)
    assert run.returncode != 0 and "'tensorrt' is not one of" in run.stderr  # the CLI's choices, listed
