"""Textual-inversion embeddings: the vectors stand exactly where word embeddings stood, for MiniLM, CLIP
and SDXL's two encoders; A1111's, the original's and diffusers' files load; a wrong width or a pickle with
objects is refused with a message saying what to do; names match as words only, and an embedding is never
split across two prompt windows."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from imagine.adapters.embeddings import Embedding, check_fits, listing, resolve_embeddings, using
from imagine.io.checkpoint import CheckpointError
from imagine.io.embeddings import load_embedding, save_embedding
from imagine.models.text_encoders import CHUNK, CLIPTextEncoder, SDXLTextEncoder, default_text_encoder
from imagine.train.textual_inversion import initial_vectors
from tests.tiny_sd import _perturb, _text_config


def _clip():
    from transformers import CLIPTextModel

    from imagine.io.stable_diffusion import clip_tokenizer

    torch.manual_seed(0)
    return CLIPTextEncoder(clip_tokenizer(), _perturb(CLIPTextModel(_text_config(32, "quick_gelu"))), "tiny-clip")


def _sdxl():
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from imagine.io.stable_diffusion import clip_tokenizer

    torch.manual_seed(1)
    models = (_perturb(CLIPTextModel(_text_config(32, "quick_gelu"))),
              _perturb(CLIPTextModelWithProjection(_text_config(48, "gelu", projection_dim=16))))
    return SDXLTextEncoder((clip_tokenizer(), clip_tokenizer("!")), models, "tiny-sdxl")


@pytest.fixture(scope="module", params=["minilm", "clip", "sdxl"])
def encoder(request):
    return {"minilm": default_text_encoder, "clip": _clip, "sdxl": _sdxl}[request.param]()


def test_an_embedding_of_a_words_vectors_encodes_as_that_word(encoder):
    """Vectors copied from "circle" in place of <c>: the same states (and SDXL's pooled) as the word."""
    emb = Embedding("<c>", initial_vectors(encoder, "circle", 1))
    want = encoder.encode(["a red circle, big"])
    with using(encoder, [emb]):
        got = encoder.encode(["a red <c>, big"])
        upper = encoder.encode(["a red <C>, big"])  # names match whatever the case, as tokenizers lower-case
    torch.testing.assert_close(got.context, want.context, rtol=0, atol=1e-5)
    torch.testing.assert_close(upper.context, want.context, rtol=0, atol=1e-5)
    if want.pooled is not None:
        torch.testing.assert_close(got.pooled, want.pooled, rtol=0, atol=1e-5)
    assert encoder.embeddings == {}  # taken away after the block
    plain = encoder.encode(["a red <c>, big"]).context  # the prompt cache does not keep the embedded states
    assert not torch.allclose(plain[:, :4], got.context[:, :4])


def test_several_vectors_and_gradients_reach_them(encoder):
    vectors = {k: v.clone().requires_grad_(True) for k, v in initial_vectors(encoder, "red circle", 3).items()}
    emb = Embedding("sks", vectors)
    with using(encoder, [emb]):
        out = encoder.encode(["a sks on the left"], grad=True)
    out.context.sum().backward()
    for v in vectors.values():
        assert v.grad is not None and (v.grad.abs().sum(1) > 0).all()  # every vector is used


def test_names_match_as_words_only():
    enc = _clip()
    emb = Embedding("sks", initial_vectors(enc, "dog", 1))
    plain, word = enc.encode(["asks sks-like <sks>"]).context, enc.encode(["a sks"]).context
    with using(enc, [emb]):
        assert torch.equal(enc.encode(["asks sks-like <sks>"]).context, plain)  # no word is "sks" alone
        torch.testing.assert_close(enc.encode(["a sks"]).context, enc.encode(["a dog"]).context, rtol=0, atol=1e-5)
    assert not torch.allclose(word, enc.encode(["a dog"]).context)


def test_an_embedding_stays_whole_in_one_window():
    enc = _clip()
    emb = Embedding("<five>", initial_vectors(enc, "a b c d e", 5))
    prompt = " ".join(["cat"] * (CHUNK - 2)) + " <five>"  # 73 tokens, then 5 vectors: they open window two
    with using(enc, [emb]):
        z = enc.encode([prompt]).context
        tail = enc.encode(["<five>"]).context
    assert z.shape[1] == 2 * (CHUNK + 2)
    torch.testing.assert_close(z[:, CHUNK + 2:], tail, rtol=0, atol=1e-5)


def test_files_round_trip_in_every_layout(tmp_path):
    enc = _clip()
    vec = torch.randn(2, 32)
    emb = Embedding("mine", {"emb_params": vec}, step=7, checkpoint="abc")
    save_embedding(emb, tmp_path / "mine.safetensors", info={"token": "<mine>"})
    back = load_embedding(tmp_path / "mine.safetensors")
    assert torch.equal(back.vectors["emb_params"], vec) and back.step == 7 and back.checkpoint == "abc"
    assert back.name == "mine" and "<mine>" in back.aliases  # the file's stem, and the token it was trained as
    # A1111 / the original textual inversion: a .pt of plain dicts and tensors, read with weights_only
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "old", "step": 3},
               tmp_path / "old.pt")
    old = load_embedding(tmp_path / "old.pt")
    assert torch.equal(old.vectors["emb_params"], vec) and old.step == 3
    # diffusers: one key, the token, holding one vector
    save_file({"<cat-toy>": vec[0].contiguous()}, tmp_path / "learned_embeds.safetensors")
    diff = load_embedding(tmp_path / "learned_embeds.safetensors")
    assert diff.vectors["emb_params"].shape == (1, 32) and "<cat-toy>" in diff.aliases
    torch.save({"<cat-toy>": vec[0]}, tmp_path / "learned_embeds.bin")
    assert torch.equal(load_embedding(tmp_path / "learned_embeds.bin").vectors["emb_params"], vec[:1])
    # SDXL: clip_l and clip_g
    xl = Embedding("xl", {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 48)})
    save_embedding(xl, tmp_path / "xl.safetensors")
    assert {k: v.shape for k, v in load_embedding(tmp_path / "xl.safetensors").vectors.items()} == \
        {"clip_l": (1, 32), "clip_g": (1, 48)}
    check_fits(_sdxl(), load_embedding(tmp_path / "xl.safetensors"))
    check_fits(enc, old)


def test_wrong_files_are_refused_with_what_to_do(tmp_path):
    enc = _clip()
    wide = Embedding("wide", {"emb_params": torch.randn(1, 768)})
    with pytest.raises(CheckpointError, match=r"SD 1.x's CLIP ViT-L.*takes emb_params of width 32"):
        check_fits(enc, wide)
    xl = Embedding("xl", {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 48)})
    with pytest.raises(CheckpointError, match="made for SDXL"):
        check_fits(enc, xl)
    with pytest.raises(CheckpointError, match="takes clip_l of width 32 \\+ clip_g of width 48"):
        check_fits(_sdxl(), Embedding("one", {"emb_params": torch.randn(1, 32)}))
    with pytest.raises(CheckpointError, match="width"), using(enc, [wide]):
        pass
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 2)},
              tmp_path / "a-lora.safetensors")
    with pytest.raises(CheckpointError, match="looks like a LoRA"):
        load_embedding(tmp_path / "a-lora.safetensors")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_embedding(tmp_path / "evil.pt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_embedding(tmp_path / "cut.safetensors")
    save_file({"emb_params": torch.full((1, 32), float("nan"))}, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="NaN"):
        load_embedding(tmp_path / "nan.safetensors")


def test_the_models_folder_finds_embeddings_by_the_name_the_prompt_writes(tmp_path):
    enc = _clip()
    folder = tmp_path / "models" / "embeddings"
    (folder / "styles").mkdir(parents=True)
    save_embedding(Embedding("a", {"emb_params": torch.randn(1, 32)}), folder / "sks-dog.safetensors")
    save_embedding(Embedding("b", {"emb_params": torch.randn(2, 32)}), folder / "styles" / "inky.safetensors")
    save_embedding(Embedding("c", {"emb_params": torch.randn(1, 768)}), folder / "big.safetensors")
    found = resolve_embeddings(["a sks-dog, in Inky style", ""], tmp_path / "models")
    assert sorted((u.embedding.name, u.source) for u in found) == [("inky", "prompt"), ("sks-dog", "prompt")]
    assert resolve_embeddings(["a dog"], tmp_path / "models") == []  # nothing named, nothing loaded
    by_file = resolve_embeddings(["a dog"], tmp_path / "models", [str(folder / "big.safetensors")])
    assert [(u.embedding.name, u.source) for u in by_file] == [("big", "option")]
    with pytest.raises(ValueError, match="no embeddings named 'nope'"):
        resolve_embeddings([""], tmp_path / "models", ["nope"])
    loaded, skipped = listing(tmp_path / "models", enc)
    assert set(loaded) == {"sks-dog", "inky"} and loaded["inky"]["vectors"] == 2 and loaded["inky"]["shape"] == 32
    assert set(skipped) == {"big"}


def test_textual_inversion_settings_are_checked():
    from imagine.train.textual_inversion import TextualInversionConfig

    TextualInversionConfig(token="sks", template="{caption}")  # captions that write the token
    for bad, message in (({"template": "a photo"}, "must write {token}"), ({"token": "two words"}, "one word"),
                         ({"vectors": 0}, "vectors must be 1 to 75")):
        with pytest.raises(ValueError, match=message):
            TextualInversionConfig(**bad)
