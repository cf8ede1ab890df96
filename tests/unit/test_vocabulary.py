"""The words a model was trained on: recorded from its captions, and the prompt words outside them named."""

from __future__ import annotations

import json

import pytest
import torch

from imagine.data.images import ImageDataset
from imagine.data.shapes import ShapesDataset
from imagine.data.vocabulary import caption_vocabulary, unknown_words, words
from imagine.io.checkpoint import CheckpointError
from imagine.io.model_folder import DiffusionModel, DiffusionSpec, load_vocabulary, save_vocabulary
from imagine.pipelines.request import vocabulary_warnings
from imagine.weights import DEFAULT_MODEL, FAST_MODEL


def test_words_are_lowercase_runs_with_inner_hyphens_and_apostrophes():
    assert words("A Three-sided, (RED:1.2) shape; don't!") == ["a", "three-sided", "red", "1", "2", "shape", "don't"]
    assert unknown_words("a red cat and a Cat", {"a", "red", "and"}) == ["cat"]


@pytest.mark.parametrize("language", [False, True])
def test_a_shapes_datasets_vocabulary_is_exactly_the_words_of_its_captions(language):
    data = ShapesDataset(size=16, language=language)
    seen = caption_vocabulary(data.scene(i)[0].caption for i in range(3000))
    assert seen == data.vocabulary()  # every word a caption can hold shows up within 3000 scenes
    if language:  # the held-out half is never trained on
        assert "crimson" not in data.vocabulary() and "scarlet" in data.vocabulary()


def test_a_folder_datasets_vocabulary_is_its_captions_words():
    data = ImageDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), (), "x",
                        captions=("a Photo of sks", "a dog"))
    assert data.vocabulary() == {"a", "photo", "of", "sks", "dog"}
    assert ImageDataset(torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), (), "x").vocabulary() is None


def test_vocabulary_files_round_trip_and_refuse_garbage(tmp_path):
    save_vocabulary(tmp_path, frozenset({"red", "circle"}), "builtin:shapes")
    assert load_vocabulary(tmp_path) == {"red", "circle"}
    assert json.loads((tmp_path / "vocabulary.json").read_text())["source"] == "builtin:shapes"
    assert load_vocabulary(tmp_path / "nothing") is None
    (tmp_path / "vocabulary.json").write_text('{"words": 3}')
    with pytest.raises(CheckpointError, match="list of words"):
        load_vocabulary(tmp_path)


def test_the_shipped_models_record_what_they_were_trained_on():
    default, fast = load_vocabulary(DEFAULT_MODEL), load_vocabulary(FAST_MODEL)
    assert default == ShapesDataset(language=True).vocabulary() and fast == ShapesDataset().vocabulary()


def _model(vocabulary):
    return DiffusionModel(None, None, DiffusionSpec(), DEFAULT_MODEL, vocabulary=vocabulary)


def test_warnings_name_unknown_words_outside_a1111_syntax_and_only_for_models_that_record_words():
    model = _model(frozenset({"a", "red", "circle"}))
    warned = vocabulary_warnings(model, "a (red:1.3) cat <lora:style:0.5> BREAK [circle]", "")
    assert len(warned) == 1 and "never saw in a training caption: cat." in warned[0]
    assert "lora" not in warned[0] and "style" not in warned[0] and "break" not in warned[0]
    assert vocabulary_warnings(model, "a red circle", "a circle") == ()
    both = vocabulary_warnings(model, "a dog", "blurry")
    assert [w.split(" has")[0] for w in both] == ["the prompt", "the negative prompt"]
    assert vocabulary_warnings(_model(None), "anything at all", "") == ()  # e.g. a Stable Diffusion checkpoint


def test_an_embeddings_name_is_a_known_word():
    from imagine.adapters.embeddings import Embedding, EmbeddingUse

    model = _model(frozenset({"a", "red", "circle"}))
    embedding = Embedding("my-style", {"emb_params": torch.zeros(1, 4)}, aliases=("sks",))
    assert vocabulary_warnings(model, "a my-style sks circle", "", embeddings=[EmbeddingUse(embedding, "prompt")]) == ()
