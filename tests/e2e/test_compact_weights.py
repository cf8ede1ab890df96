"""Compact weights end to end: an SD 1.x checkpoint converted to GGUF (imagine convert --to gguf) and run from
the .gguf, a Flux transformer in the GGUF layout people's files use (Black Forest Labs' keys, no prefix,
its text encoders and VAE as separate files) run with its weights packed, and fp8 storage: each close to the
full-precision model's image, each recorded, the GGUF one reproduced by --from."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from imagine.cli import app
from imagine.io import stable_diffusion as sd
from imagine.nn import compact
from imagine.pipelines import generate as g
from imagine.pipelines.request import Request, load_text_model, run
from imagine.pipelines.settings import Settings
from tests.tiny_sd import write_flux, write_pipeline

runner = CliRunner()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) ** 2).mean()
    return 10 * np.log10(255**2 / max(mse, 1e-12))


def image(path, settings: Settings, weights_dtype: str = "fp32") -> tuple[np.ndarray, dict]:
    model, encoder = load_text_model(path, weights_dtype=weights_dtype)
    out = run(Request("txt2img", settings).check(model), model, encoder)[0]
    return out.pixels, out.record


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd1")
    write_pipeline("sd1", tmp / "pipe")
    sd.save_single_file(sd.load_any(tmp / "pipe"), tmp / "tiny-sd1.safetensors")
    return tmp / "tiny-sd1.safetensors"


def test_an_sd1_checkpoint_converted_to_gguf_runs_close_and_reproduces(sd1_file, tmp_path):
    out = tmp_path / "tiny-sd1-Q8_0.gguf"
    result = runner.invoke(app, ["convert", str(sd1_file), str(out), "--to", "gguf", "--quant", "Q8_0"])
    assert result.exit_code == 0, result.output
    assert "Q8_0" in result.output and out.stat().st_size < sd1_file.stat().st_size
    model, _ = load_text_model(out)
    assert compact.describe(model.unet) == {"Q8_0": compact.describe(model.unet)["Q8_0"]}
    s = Settings(prompt="a red cat", steps=4, seed=3, width=64, height=64)
    full, _ = image(sd1_file, s)
    packed, record = image(out, s)
    assert psnr(full, packed) > 40 and record["weights_dtype"] == "gguf Q8_0"
    made = runner.invoke(app, ["generate", "a red cat", "--model", str(out), "--steps", "4", "--seed", "3",
                               "--width", "64", "--height", "64", "--out", str(tmp_path / "a")])
    assert made.exit_code == 0, made.output
    png = next((tmp_path / "a").glob("*.png"))
    again = runner.invoke(app, ["generate", "--from", str(png), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(next((tmp_path / "b").glob("*.png")))))
    # K-quants are read, not written; a file that is no GGUF is refused by name
    bad = runner.invoke(app, ["convert", str(sd1_file), str(tmp_path / "k.gguf"), "--to", "gguf", "--quant", "Q4_K"])
    assert bad.exit_code == 2 and "read, not written" in bad.output
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(20))
    broken = runner.invoke(app, ["generate", "x", "--model", str(tmp_path / "broken.gguf")])
    assert broken.exit_code == 2 and "not a readable GGUF file" in broken.output


def test_fp8_storage_computes_in_bf16_close_to_full_precision(sd1_file):
    s = Settings(prompt="a red cat", steps=4, seed=3, width=64, height=64)
    full, _ = image(sd1_file, s)
    model, encoder = load_text_model(sd1_file, weights_dtype="fp8")
    kinds = compact.describe(model.unet)
    assert set(kinds) == {compact.FP8} and kinds[compact.FP8] > 10
    with pytest.raises(ValueError, match="precision bf16"):
        Request("txt2img", s).check(model)
    bf16 = Settings(**{**s.__dict__, "precision": "bf16"})
    out = run(Request("txt2img", bf16).check(model), model, encoder)[0]
    assert out.record["weights_dtype"] == "float8_e4m3fn"
    assert psnr(full, out.pixels) > 30


def test_a_flux_transformer_in_peoples_gguf_layout_runs_with_its_parts(tmp_path):
    """As ComfyUI-GGUF's flux1-dev-Q8_0.gguf: the transformer alone, Black Forest Labs' keys without a prefix,
    in models/Stable-diffusion/, with clip_l, t5xxl and ae files in models/text_encoders/ and VAE/."""
    from safetensors.torch import save_file

    from imagine.io import flux_files
    from imagine.io.gguf_files import write_gguf
    from imagine.io.ldm_keys import vae_map, write_mapped

    write_flux(tmp_path / "pipe", dev=True, inferable=True)
    model, encoder = load_text_model(tmp_path / "pipe")
    net = model.unet
    original = write_mapped(net.state_dict(), flux_files.transformer_map(net.config))
    models = tmp_path / "models"
    gguf_file = models / "Stable-diffusion" / "flux-tiny-Q8_0.gguf"
    gguf_file.parent.mkdir(parents=True)
    counts = write_gguf(original, gguf_file, "flux", "Q8_0")
    assert counts["Q8_0"] > 10
    for folder in ("text_encoders", "VAE"):
        (models / folder).mkdir()
    save_file({k if k.startswith("text_model.") else "text_model." + k: v.contiguous()
               for k, v in encoder.model.state_dict().items() if not k.endswith("position_ids")},
              str(models / "text_encoders" / "clip_l.safetensors"))
    save_file({k: v.contiguous() for k, v in encoder.t5.model.state_dict().items()
               if k != "encoder.embed_tokens.weight"}, str(models / "text_encoders" / "t5xxl_fp16.safetensors"))
    with torch.device("meta"):
        vae_keys = list(type(model.vae)(model.vae.config).state_dict())
    save_file({k: v.contiguous() for k, v in write_mapped(model.vae.state_dict(),
                                                          vae_map(vae_keys, model.vae.config, "")).items()},
              str(models / "VAE" / "ae.safetensors"))
    shutil.copytree(tmp_path / "pipe" / "tokenizer_2", gguf_file.parent / "tokenizer_2")
    loaded = sd.load_single_file(gguf_file)
    assert loaded.arch == "flux" and compact.describe(loaded.unet)["Q8_0"] >= counts["Q8_0"]  # fused Q, K, V split
    assert compact.weight_bytes(loaded.unet) < compact.weight_bytes(net) / 2.5
    s = g.Settings(prompt="a red circle", steps=2, sampler="euler", cfg_scale=1.0, seed=4, width=16, height=16)
    want, got = g.txt2img(model, s, encoder), g.txt2img(loaded, s, loaded.text_encoder)
    to8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().numpy()  # noqa: E731
    assert psnr(to8(want), to8(got)) > 35
