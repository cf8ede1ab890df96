"""A LyCORIS file through the doors: --lora, the <lora:NAME:W> tag, the record, merge-lora."""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn


def test_a_loha_file_goes_through_the_cli_tags_and_merge(tiny_t2i_dir, tmp_path):
    """A LyCORIS LoHa file in kohya's names on the tiny model's attention: --lora and the <lora:NAME:W> tag draw
    the same image and record it; merge-lora folds it in (the merged model draws what the attached one did)."""
    import numpy as np
    from PIL import Image

    from imagine.io.model_folder import load_model_folder
    from tests.e2e.inprocess import imagine

    unet = load_model_folder(tiny_t2i_dir).unet
    names = [n for n, m in unet.named_modules()
             if n.endswith(("attn1.to_q", "attn2.to_v")) and isinstance(m, nn.Linear)]
    g = torch.Generator().manual_seed(0)
    out = {}
    for n in names:
        w = unet.get_submodule(n).weight
        for k, shape in (("hada_w1_a", (w.shape[0], 2)), ("hada_w1_b", (2, w.shape[1])),
                         ("hada_w2_a", (w.shape[0], 2)), ("hada_w2_b", (2, w.shape[1]))):
            out[f"lora_unet_{n.replace('.', '_')}.{k}"] = torch.randn(shape, generator=g)
        out[f"lora_unet_{n.replace('.', '_')}.alpha"] = torch.tensor(2.0)
    (tmp_path / "models" / "Lora").mkdir(parents=True)
    save_file(out, str(tmp_path / "models" / "Lora" / "hada.safetensors"))
    common = ["--model", tiny_t2i_dir, "--steps", 3, "--seed", 2, "--models-dir", tmp_path / "models"]
    for args, folder in ((["a red circle", "--lora", "hada:0.8"], "opt"), (["a red circle <lora:hada:0.8>"], "tag"),
                         (["a red circle"], "plain")):
        run = imagine("generate", *args, *common, "--out", tmp_path / folder)
        assert run.returncode == 0, run.stderr[-2000:]
    opt, tag, plain = (np.asarray(Image.open(next((tmp_path / f).glob("*.png")))) for f in ("opt", "tag", "plain"))
    assert np.array_equal(opt, tag) and not np.array_equal(opt, plain)
    assert "Lora hashes" in Image.open(next((tmp_path / "opt").glob("*.png"))).info["parameters"]
    run = imagine("merge-lora", "--model", tiny_t2i_dir, "--lora", "hada:0.8", "--models-dir", tmp_path / "models",
                  "--out", tmp_path / "merged")
    assert run.returncode == 0, run.stderr[-2000:]
    run = imagine("generate", "a red circle", *common[2:], "--model", tmp_path / "merged", "--out", tmp_path / "m")
    assert run.returncode == 0, run.stderr[-2000:]
    merged = np.asarray(Image.open(next((tmp_path / "m").glob("*.png")))).astype(int)
    assert np.abs(merged - opt.astype(int)).max() <= 2  # the same update, folded (float rounding apart)
    # the checkpoint merger takes the adapter as B: A + M dW, the same weights as merge-lora at weight M
    run = imagine("merge", tiny_t2i_dir, "hada", "--mode", "add-difference", "--multiplier", 0.8, "--models-dir",
                  tmp_path / "models", "--out", tmp_path / "by-merger")
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = (load_model_folder(tmp_path / f).unet.state_dict() for f in ("merged", "by-merger"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    run = imagine("merge", tiny_t2i_dir, "hada", tiny_t2i_dir, "--mode", "add-difference", "--models-dir",
                  tmp_path / "models", "--out", tmp_path / "refused")
    assert run.returncode != 0 and "no C" in run.stderr
