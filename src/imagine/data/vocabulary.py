"""The words a model was trained on. ``imagine train`` records its captions' words with the model
(``vocabulary.json``), and generation names the words of a prompt that no training caption held: a model
trained on four shapes draws *something* for "a cat", and the user should hear why it is not a cat.

Words are lowercase runs of letters and digits, joined by inner hyphens or apostrophes ("three-sided",
"don't"); punctuation and A1111's attention syntax are not words."""

from __future__ import annotations

import re
from collections.abc import Iterable

WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def words(text: str) -> list[str]:
    """The words of ``text``, lowercased, in order."""
    return WORD.findall(text.lower())


def caption_vocabulary(captions: Iterable[str]) -> frozenset[str]:
    """Every word of these captions."""
    out: set[str] = set()
    for caption in captions:
        out.update(words(caption))
    return frozenset(out)


def unknown_words(text: str, vocabulary: Iterable[str]) -> list[str]:
    """The words of ``text`` outside ``vocabulary``, each once, in the order they first appear."""
    known = vocabulary if isinstance(vocabulary, (set, frozenset)) else set(vocabulary)
    return list(dict.fromkeys(w for w in words(text) if w not in known))
