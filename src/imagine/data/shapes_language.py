"""The language of builtin:shapes: how people say what a scene holds, in two disjoint halves.

Every concept (a colour, a shape, a size, a count, a relation, a sentence frame, a word order) has phrasings
in a ``train`` half and a ``held_out`` half that share no phrasing, and no held-out phrasing contains a
word of builtin:shapes' own captions ("carrot orange" would hand the model "orange"). Training captions may
use the train half only; the held-out half exists so that an evaluation can ask whether a model
understands words it never saw in a caption, which a frozen sentence encoder knows to mean the same thing
("a crimson ball" is "a red circle"). The canonical words of builtin:shapes' templates ("red", "circle",
"above", "two") are in the train half.

Deterministic: ``phrase_*`` draw every choice from the ``random.Random`` they are given.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Half = Literal["train", "held_out"]
HALVES: tuple[str, ...] = ("train", "held_out")


@dataclass(frozen=True)
class Words:
    train: tuple[str, ...]
    held_out: tuple[str, ...]

    def of(self, half: Half) -> tuple[str, ...]:
        return self.train if half == "train" else self.held_out


# colour names of builtin:shapes -> plain synonyms (what the renderer draws for each is fixed)
COLOR_WORDS = {
    "red": Words(("red", "scarlet"), ("crimson", "ruby")),
    "green": Words(("green", "emerald"), ("jade", "lime")),
    "blue": Words(("blue", "azure"), ("cobalt", "sapphire")),
    "yellow": Words(("yellow", "golden"), ("lemon", "canary")),
    "orange": Words(("orange", "tangerine"), ("pumpkin", "apricot")),
    "purple": Words(("purple", "violet"), ("plum", "amethyst")),
    "pink": Words(("pink", "rose"), ("fuchsia", "flamingo")),
    "cyan": Words(("cyan", "turquoise"), ("aqua", "aquamarine")),
    "white": Words(("white", "snow white"), ("ivory", "snowy")),
}
# shape -> (singular, plural) phrasings
SHAPE_WORDS = {
    "circle": Words(("circle/circles", "disk/disks"), ("ball/balls", "orb/orbs")),
    "square": Words(("square/squares", "box/boxes"), ("block/blocks", "tile/tiles")),
    "triangle": Words(("triangle/triangles", "triangular shape/triangular shapes"),
                      ("pyramid/pyramids", "three-sided shape/three-sided shapes")),
    "star": Words(("star/stars", "star shape/star shapes"),
                  ("pentagram/pentagrams", "five-pointed figure/five-pointed figures")),
}
SIZE_WORDS = {"small": Words(("small", "little"), ("tiny", "miniature")),
              "large": Words(("large", "big"), ("huge", "giant"))}
# counts: number words in training, digits held out
COUNT_WORDS = {2: Words(("two",), ("2",)), 3: Words(("three",), ("3",)), 4: Words(("four",), ("4",))}
RELATION_WORDS = {
    "above": Words(("above", "over"), ("on top of", "higher than")),
    "below": Words(("below", "under"), ("beneath", "underneath")),
    "to the left of": Words(("to the left of", "left of"), ("on the left side of", "further left than")),
    "to the right of": Words(("to the right of", "right of"), ("on the right side of", "further right than")),
}
AND_WORDS = Words(("and", "with"), ("as well as", "plus"))
# whole-sentence frames around the description
FRAMES = Words(("{}", "a picture of {}", "there is {}", "an image of {}"),
               ("please draw {}", "show me {}", "a drawing with {}", "i would like {}"))
# word orders of one object: adjectives first (train) or the colour after the noun (held out)
ORDERS = Words(("{size}{color} {shape}",), ("{size}{shape} colored {color}", "{size}{shape} in {color}"))


def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _noun(shape: str, plural: bool, rng: random.Random, half: Half) -> str:
    singular, plural_form = rng.choice(SHAPE_WORDS[shape].of(half)).split("/")
    return plural_form if plural else singular


def phrase_object(rng: random.Random, half: Half, shape: str, color: str, size: str | None = None,
                  count: int = 1) -> str:
    """One object (or ``count`` alike): "a crimson ball", "3 jade pyramids", "a huge block in ivory"."""
    size_text = f"{rng.choice(SIZE_WORDS[size].of(half))} " if size else ""
    text = rng.choice(ORDERS.of(half)).format(size=size_text, color=rng.choice(COLOR_WORDS[color].of(half)),
                                              shape=_noun(shape, count > 1, rng, half))
    if count > 1:
        return f"{rng.choice(COUNT_WORDS[count].of(half))} {text}"
    return with_article(text)


def phrase_pair(rng: random.Random, half: Half, first: str, second: str, relation: str | None = None) -> str:
    """Two described objects joined by "and" (or its synonyms) or by a spatial relation."""
    link = rng.choice(RELATION_WORDS[relation].of(half)) if relation else rng.choice(AND_WORDS.of(half))
    return f"{first} {link} {second}"


def frame(rng: random.Random, half: Half, description: str, plural: bool = False) -> str:
    """A sentence around the description ("there is a red circle"; "there are two ..." when plural)."""
    text = rng.choice(FRAMES.of(half)).format(description)
    return text.replace("there is ", "there are ", 1) if plural else text


def vocabulary(half: Half) -> set[str]:
    """Every phrasing of a half (words and multi-word phrases; frames without their slot)."""
    out: set[str] = set()
    for table in (COLOR_WORDS, SIZE_WORDS, COUNT_WORDS, RELATION_WORDS):
        for words in table.values():
            out.update(words.of(half))
    for words in SHAPE_WORDS.values():
        for pair in words.of(half):
            out.update(pair.split("/"))
    out.update(AND_WORDS.of(half))
    out.update(f.replace("{}", "").strip() for f in FRAMES.of(half) if f != "{}")
    return out
