"""`imagine textual-inversion`: a new word's vectors learn with everything else frozen, resume exactly, and
the file is used by name from models/embeddings/ or by `--embedding FILE`, recorded in the PNG (`TI
hashes`) so `--from` draws the same image; a wrong-width embedding is refused through the CLI."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from imagine.adapters.embeddings import Embedding
from imagine.data.images import load_dataset
from imagine.io.embeddings import load_embedding, save_embedding
from imagine.io.png import read_png_metadata
from imagine.pipelines.request import load_text_model
from imagine.train.textual_inversion import TextualInversionConfig, train_textual_inversion
from tests.e2e.inprocess import imagine

_imagine = imagine  # in-process (tests/e2e/inprocess.py)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _train(model_dir, out, steps, resume=False):
    model, encoder = load_text_model(model_dir)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    data = load_dataset("builtin:shapes", model.spec.image_size, captions=True)
    cfg = TextualInversionConfig(token="<thing>", vectors=2, init_word="shape", template="{caption}, {token}",
                                 steps=steps, batch_size=2, checkpoint_every=2)
    train_textual_inversion(model, encoder, data, cfg, out, resume=resume)
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())  # all frozen
    assert all(torch.equal(text_before[k], v) for k, v in encoder.model.state_dict().items())
    assert encoder.embeddings == {}
    return load_embedding(out).vectors["emb_params"]


def test_textual_inversion_learns_only_its_vectors_and_resumes_exactly(tiny_t2i_dir, tmp_path):
    straight = _train(tiny_t2i_dir, tmp_path / "a.safetensors", 4)
    _, encoder = load_text_model(tiny_t2i_dir)
    ids = encoder.tokenizer("shape", add_special_tokens=False)["input_ids"]
    start = encoder.model.get_input_embeddings().weight[ids[0]]
    assert straight.shape == (2, 384) and not torch.allclose(straight[0], start)  # the vectors moved
    _train(tiny_t2i_dir, tmp_path / "b.safetensors", 2)
    resumed = _train(tiny_t2i_dir, tmp_path / "b.safetensors", 4, resume=True)
    assert torch.equal(straight, resumed)


def test_embeddings_by_name_by_file_and_from(tiny_t2i_dir, tmp_path):
    out = tmp_path / "sks-shape.safetensors"
    run = _imagine("textual-inversion", "--model", tiny_t2i_dir, "--data", "builtin:shapes", "--token", "<sks>",
                   "--out", out, "--steps", "2", "--batch-size", "2", "--init-word", "star", "--lr", "0.5",
                   cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "sks-shape-training" / "samples" / "step_0000002.png").exists()
    (tmp_path / "models" / "embeddings").mkdir(parents=True)
    (tmp_path / "models" / "embeddings" / out.name).write_bytes(out.read_bytes())

    def generate(prompt, *extra):
        gen = _imagine("generate", prompt, "--model", tiny_t2i_dir, "--steps", "3", "--seed", "2", "--out", "out",
                       *extra, cwd=tmp_path)
        assert gen.returncode == 0, gen.stderr[-2000:]
        return tmp_path / gen.stdout.strip().splitlines()[-1]

    words = generate("a red sks-shape", "--models-dir", tmp_path / "none")  # no embeddings: plain words
    # ./models/embeddings/ is the default; the file is found by its stem and by the token it was trained as
    by_name, by_token = generate("a red sks-shape"), generate("a red <sks>")
    assert np.abs(_pixels(by_name) - _pixels(words)).max() > 0
    assert np.array_equal(_pixels(by_token), _pixels(by_name))
    parameters, record = read_png_metadata(by_name)
    assert "TI hashes: " in parameters and "sks-shape: " in parameters
    assert record["embeddings"][0]["source"] == "prompt" and record["embeddings"][0]["vectors"] == 1
    _, token_record = read_png_metadata(by_token)
    assert token_record["embeddings"][0]["name"] == "sks-shape"
    word = generate("a red star")
    assert np.abs(_pixels(by_name) - _pixels(word)).max() > 0  # the learned vector is not the init word's
    copy = tmp_path / "elsewhere.safetensors"
    copy.write_bytes(out.read_bytes())
    by_file = generate("a red elsewhere", "--embedding", copy, "--models-dir", tmp_path / "none")
    assert np.array_equal(_pixels(by_file), _pixels(by_name))  # the same vectors, found by file
    for png in (by_name, by_file):
        again = _imagine("generate", "--from", png, "--out", "again", cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-2000:]
        assert np.array_equal(_pixels(tmp_path / again.stdout.strip().splitlines()[-1]), _pixels(png))
    save_embedding(Embedding("wide", {"emb_params": torch.zeros(1, 768)}), tmp_path / "wide.safetensors")
    bad = _imagine("generate", "a wide", "--model", tiny_t2i_dir, "--embedding", tmp_path / "wide.safetensors",
                   "--steps", "2", cwd=tmp_path)
    assert bad.returncode != 0 and "SD 1.x's CLIP ViT-L" in bad.stderr and "width 384" in bad.stderr
