"""The text path: A1111 emphasis and chunking against hand-computed expectations; encoders offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from imagine.a1111 import BREAK, parse_prompt_attention
from imagine.models.text_encoders import CHUNK, CLIPTextEncoder, chunk_tokens, default_text_encoder


@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a [b] c", [("a ", 1.0), ("b", 1 / 1.1), (" c", 1.0)]),
    ("(x:0.5)", [("x", 0.5)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", BREAK), ("b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_emphasis_syntax(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_nested_emphasis_multiplies():
    got = dict(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[i] for i in range(9))
    assert got["house"] == pytest.approx(1.3 * 1.1 * 1.1)  # (( (house:1.3) ))
    assert got["sky"] == pytest.approx(1.1**4)  # (((sky))) inside an unclosed (
    assert got["hill"] == pytest.approx(0.5 * 1.1)


def test_chunks_split_at_75_and_back_up_to_a_comma():
    # 70 tokens, a comma, 20 more: the 75-token window is full at token 75; the comma sits 5 tokens back
    # (within 20), so the first window ends after the comma: 71 tokens, and 20 go to the next
    chunks = chunk_tokens([(list(range(100, 170)), 1.0), ([5], 1.0), (list(range(200, 220)), 1.2)], comma_id=5)
    assert [len(c.tokens) for c in chunks] == [71, 20]
    assert chunks[0].tokens[-1] == 5 and chunks[1].tokens[:2] == (200, 201)
    assert chunks[1].weights == (1.2,) * 20
    no_comma = chunk_tokens([(list(range(160)), 1.0)], comma_id=None)
    assert [len(c.tokens) for c in no_comma] == [75, 75, 10]  # nothing dropped
    broken = chunk_tokens([([1, 2], 1.0), ([], BREAK), ([3], 1.0)], comma_id=None)
    assert [c.tokens for c in broken] == [(1, 2), (3,)]
    assert [c.tokens for c in chunk_tokens([], None)] == [()]


@pytest.fixture(scope="module")
def minilm():
    return default_text_encoder()


def test_long_prompts_are_chunked_not_truncated(minilm):
    long = ", ".join(f"a red circle number {i}" for i in range(30))  # ~180 tokens
    n_tokens = len(minilm.tokenizer(long, add_special_tokens=False)["input_ids"])
    out = minilm.encode([long, "short"])
    windows = out.context.shape[1] // (CHUNK + 2)
    assert windows == -(-n_tokens // CHUNK) or windows == -(-n_tokens // CHUNK) + 1  # comma backtracking may add one
    assert out.context.shape == (2, windows * (CHUNK + 2), 384) and out.mask.shape == out.context.shape[:2]
    assert int(out.mask[0].sum()) == n_tokens + 2 * windows  # every token kept, plus CLS and SEP per window
    assert out.mask[1, : CHUNK + 2].sum() == 3  # [CLS] short [SEP]; its padding windows come from ""


def test_emphasis_scales_one_token_and_restores_the_mean(minilm):
    plain = minilm.encode(["a red circle"]).context[0]
    weighted = minilm.encode(["a (red:1.5) circle"]).context[0]
    ids = minilm.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3  # [CLS] a red circle [SEP]: "red" is position 2
    ratio = weighted[:5] / plain[:5]
    c = ratio[1].mean()  # the mean-restoring factor, shared by all tokens
    torch.testing.assert_close(ratio[2], torch.full_like(ratio[2], 1.5 * float(c)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ratio[3], torch.full_like(ratio[3], float(c)), rtol=1e-4, atol=1e-5)
    assert weighted[:5].mean().item() == pytest.approx(plain[:5].mean().item() * (5 / 77) / (5 / 77), rel=1e-4)


def test_embeddings_are_cached_and_independent_of_the_batch(minilm):
    minilm._cache.clear()  # the encoder is shared: other tests may have encoded these prompts already
    calls = []
    original = minilm._window
    minilm._window = lambda chunks, skip, table: (calls.append(1), original(chunks, skip, table))[1]
    try:
        a = minilm.encode(["a blue star"])
        b = minilm.encode(["a blue star", "two green boxes", "a blue star"])
    finally:
        minilm._window = original
    assert len(calls) == 2  # "a blue star" once, "two green boxes" once
    assert torch.equal(a.context[0], b.context[0]) and torch.equal(b.context[0], b.context[2])


def test_minilm_loads_with_no_network(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path),
           "NO_PROXY": "*", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    code = "from imagine.models.text_encoders import MiniLMTextEncoder as M; print(M().encode(['hi']).context.shape)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([1, 77, 384])" in out.stdout


def test_minilm_tokenizer_is_transformers_own_without_importing_it(minilm):
    """The tokenizers-library tokenizer gives transformers' ids, on long text too (the file's own 128-token
    truncation and padding are off), and the transformer itself is loaded on first use only."""
    from transformers import AutoTokenizer

    from imagine.models.text_encoders import MiniLMTextEncoder

    reference = AutoTokenizer.from_pretrained(str(minilm.path), local_files_only=True)
    texts = ["a red circle", "A Crimson BALL, left of 3 squares!", "naïve café — über", "日本語 text", "",
             " ".join(["word"] * 300), "(emph:1.2) [x] \\( y"]
    for text in texts:
        for special in (False, True):
            assert (minilm.tokenizer(text, add_special_tokens=special)["input_ids"]
                    == reference(text, add_special_tokens=special)["input_ids"]), (text, special)
    assert (minilm.tokenizer.cls_token_id, minilm.tokenizer.sep_token_id, minilm.tokenizer.pad_token_id) == (
        reference.cls_token_id, reference.sep_token_id, reference.pad_token_id)
    lazy = MiniLMTextEncoder()
    assert lazy._model is None and lazy.dim == 384 and lazy.num_layers == 6
    assert torch.equal(lazy.encode(["a red circle"]).context, minilm.encode(["a red circle"]).context)
    assert lazy._model is not None


def test_the_lazy_transformer_loads_once_when_threads_race_for_it(tmp_path):
    """A server asks for the text encoder's transformer from request threads and its worker at once, and may
    load another model's CLIP at the same moment; in a fresh process (transformers not yet imported) every
    thread gets its model, the MiniLM threads the one model, and none an ImportError."""
    clip = _tiny_clip(tmp_path)
    code = (
        "import sys, threading\n"
        "from imagine.models.text_encoders import CLIPTextEncoder, MiniLMTextEncoder\n"
        "enc = MiniLMTextEncoder()\n"
        "got, clips, errors = [], [], []\n"
        "def ask():\n"
        "    try:\n"
        "        got.append(enc.model)\n"
        "    except Exception as err:\n"
        "        errors.append(repr(err))\n"
        "def load():\n"
        "    try:\n"
        "        clips.append(CLIPTextEncoder.from_folder(sys.argv[1]))\n"
        "    except Exception as err:\n"
        "        errors.append(repr(err))\n"
        "threads = [threading.Thread(target=f) for f in (ask, load, ask, load, ask, ask)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "assert not errors, errors\n"
        "assert len(got) == 4 and all(m is got[0] for m in got) and len(clips) == 2\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code, str(clip)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def _tiny_clip(folder):
    """A random CLIP text model and a character-level CLIP tokenizer, built offline."""
    from transformers import CLIPTextConfig, CLIPTextModel

    chars = list("abcdefghijklmnopqrstuvwxyz,")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>",
                                                              "bos_token": "<|startoftext|>",
                                                              "eos_token": "<|endoftext|>",
                                                              "unk_token": "<|endoftext|>"}))
    return folder


def test_clip_encoder_windows_and_clip_skip(tmp_path):
    folder = _tiny_clip(tmp_path)
    last = CLIPTextEncoder.from_folder(folder, clip_skip=1)
    penultimate = CLIPTextEncoder.from_folder(folder, clip_skip=2)
    out = last.encode(["abc", "a" * 80])  # 80 single-character tokens: 2 windows
    assert out.context.shape == (2, 2 * (CHUNK + 2), 16)
    assert out.mask.all()  # SD attends to the padding: no mask
    assert not torch.allclose(out.context, penultimate.encode(["abc", "a" * 80]).context)
    with pytest.raises(ValueError, match="clip skip must be >= 1"):
        CLIPTextEncoder.from_folder(folder, clip_skip=0)


def test_a_text_encoder_folder_with_only_a_pickle_is_refused(tmp_path):
    """Unpickling runs code: a .bin-only folder is refused, naming the file and how to convert it."""
    from imagine.models.text_encoders import CLIPTextEncoder, require_safetensors

    folder = tmp_path / "te"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is a pickle.*safe_serialization=True"):
        require_safetensors(folder)
    with pytest.raises(ValueError, match="is a pickle"):
        CLIPTextEncoder.from_folder(folder)
    (folder / "model.safetensors").write_bytes(b"")
    assert require_safetensors(folder) == folder


def test_prefill_batches_plain_prompts_as_one_by_one_encoding_would(minilm):
    """A GPU training run encodes new captions in one batch (MiniLMTextEncoder.prefill): each cached window
    equals the prompt encoded alone up to float rounding, with the same mask; emphasised prompts are left to
    encode()."""
    prompts = ["a red circle", "please draw two jade pyramids above a cobalt ball", ""]
    alone = [minilm._encode_one(p, 1) for p in prompts]
    minilm._cache.clear()
    minilm.prefill([*prompts, "a (red:1.2) box", prompts[0]])
    for prompt, (z, mask, _) in zip(prompts, alone, strict=True):
        cached_z, cached_mask, _ = minilm._cache[(prompt, 1)]
        torch.testing.assert_close(cached_z, z, atol=1e-5, rtol=0)
        assert torch.equal(cached_mask, mask)
    assert ("a (red:1.2) box", 1) not in minilm._cache
