"""``builtin:shapes``: a deterministic, effectively infinite captioned world of simple scenes.

Item i is always the same image: 1 to 4 objects (circle, square, triangle, star) in 9 named colours, two
sizes, placed on a plain dark or coloured background, with a caption drawn from varied templates and
synonyms ("a small red circle in the top left", "two blue squares", "a yellow star above a green
triangle", "a red circle to the left of a blue square") and structured labels (each object's shape,
colour, size, bounding box and mask) for evaluation and control work.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from imagine.data import shapes_language as lang
from imagine.data.vocabulary import caption_vocabulary

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (245, 215, 40),
    "orange": (250, 140, 30), "purple": (150, 60, 200), "pink": (245, 130, 200), "cyan": (40, 210, 220),
    "white": (245, 245, 245),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (70, 70, 70), "navy": (15, 25, 70), "dark green": (15, 55, 30),
               "brown": (70, 40, 20)}
SIZES = {"small": 0.10, "large": 0.17}  # radius as a fraction of the canvas
SYNONYMS = {"circle": ("circle", "disk"), "square": ("square", "box"), "triangle": ("triangle",),
            "star": ("star",), "small": ("small", "little"), "large": ("large", "big")}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
REGIONS = {(0, 0): "top left", (1, 0): "top", (2, 0): "top right", (0, 1): "left", (1, 1): "center",
           (2, 1): "right", (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right"}
REGION_PHRASES = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
                  "left": "on the left", "center": "in the center", "right": "on the right",
                  "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right"}
RELATIONS = ("above", "below", "to the left of", "to the right of")
SUPERSAMPLE = 4
# how far each shape reaches from its centre, in radii: a square's corners and a triangle's lower
# vertices lie beyond the radius, so placement keeps these extents apart, not the radii
EXTENT = {"circle": 1.0, "star": 1.0, "square": 0.86 * 2**0.5, "triangle": 1.15}


@dataclass
class ShapeObject:
    shape: str
    color: str
    size: str
    center: tuple[float, float]  # in [0, 1] canvas units, y down
    radius: float  # canvas units
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 pixels, exclusive
    mask: np.ndarray | None = field(default=None, repr=False)  # (H, W) bool

    @property
    def region(self) -> str:
        return REGIONS[(min(2, int(self.center[0] * 3)), min(2, int(self.center[1] * 3)))]


@dataclass
class Scene:
    objects: list[ShapeObject]
    background: str
    caption: str
    kind: str  # single, count, pair, relation
    relation: str | None = None


def polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.86
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a) + r * 0.15)
                for a in (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(shape)


def draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, canvas: int, fill) -> None:
    cx, cy, r = obj.center[0] * canvas, obj.center[1] * canvas, obj.radius * canvas
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon(obj.shape, cx, cy, r), fill=fill)


def render(scene: Scene, size: int) -> np.ndarray:
    """(size, size, 3) uint8, drawn at 4x and downsampled (antialiased); fills each object's bbox and mask."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_object(draw, obj, big, COLORS[obj.color])
        alpha = Image.new("L", (big, big), 0)
        draw_object(ImageDraw.Draw(alpha), obj, big, 255)
        mask = np.asarray(alpha.resize((size, size), Image.BOX)) >= 128
        obj.mask = mask
        ys, xs = np.nonzero(mask)
        obj.bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (0, 0, 0, 0)
    return np.asarray(img.resize((size, size), Image.LANCZOS))


def _place(rng: random.Random, radii: list[float], tries: int = 200) -> list[tuple[float, float]] | None:
    """Centers for objects of these radii, inside the canvas and apart by a margin."""
    placed: list[tuple[float, float, float]] = []
    for r in radii:
        for _ in range(tries):
            x, y = rng.uniform(r + 0.02, 1 - r - 0.02), rng.uniform(r + 0.02, 1 - r - 0.02)
            if all(math.hypot(x - px, y - py) > r + pr + 0.04 for px, py, pr in placed):
                placed.append((x, y, r))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def _relation_centers(rng: random.Random, r1: float, r2: float, relation: str) -> tuple[tuple, tuple]:
    """A above/below/left/right of B, unambiguously: the main-axis gap exceeds both radii and dominates."""
    gap = r1 + r2 + 0.06
    along = rng.uniform(gap, 1 - r1 - r2 - 0.04)
    start = rng.uniform(max(r1, r2) + 0.02, 1 - along - max(r1, r2) - 0.02) if along < 1 - 2 * max(r1, r2) - 0.04 \
        else max(r1, r2) + 0.02
    cross_a = rng.uniform(0.3, 0.7)
    cross_b = min(max(cross_a + rng.uniform(-0.12, 0.12), max(r1, r2) + 0.02), 1 - max(r1, r2) - 0.02)
    first, second = start, start + along  # first is nearer the top / left
    if relation in ("above", "to the left of"):
        a_main, b_main = first, second
    else:
        a_main, b_main = second, first
    if relation in ("above", "below"):
        return (cross_a, a_main), (cross_b, b_main)
    return (a_main, cross_a), (b_main, cross_b)


def with_article(words: str) -> str:
    """ "a red circle", "an orange star"."""
    return ("an " if words[0] in "aeiou" else "a ") + words


def _phrase(rng: random.Random, obj: ShapeObject, *, size: bool, article: bool = True) -> str:
    words = []
    if size:
        words.append(rng.choice(SYNONYMS[obj.size]))
    words += [obj.color, rng.choice(SYNONYMS[obj.shape])]
    text = " ".join(words)
    return with_article(text) if article else text


def make_scene(i: int, seed: int = 0) -> Scene:
    """The deterministic scene of item i."""
    rng = random.Random(seed * 1_000_003 + i)
    background = rng.choice(list(BACKGROUNDS)) if rng.random() < 0.5 else "black"
    kind = rng.choices(["single", "count", "pair", "relation"], weights=[0.3, 0.2, 0.15, 0.35])[0]

    def new(shape=None, color=None, size=None) -> ShapeObject:
        size = size or rng.choice(list(SIZES))
        return ShapeObject(shape or rng.choice(SHAPES), color or rng.choice(list(COLORS)), size, (0.5, 0.5),
                           SIZES[size] * rng.uniform(0.9, 1.1))

    while True:
        relation = None
        if kind == "single":
            objs = [new()]
        elif kind == "count":
            n = rng.randint(2, 4)
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            objs = [new(shape, color, "small") for _ in range(n)]
        else:
            a = new()
            b = new()
            while (b.shape, b.color) == (a.shape, a.color):
                b = new()
            objs = [a, b]
            if kind == "relation":
                relation = rng.choice(RELATIONS)
                for o in objs:  # relations read best between clearly separated, smaller objects
                    o.size, o.radius = "small", SIZES["small"] * rng.uniform(0.9, 1.1)
                a.center, b.center = _relation_centers(rng, a.radius, b.radius, relation)
                break
        centers = _place(rng, [o.radius * EXTENT[o.shape] for o in objs])
        if centers is not None:
            for o, c in zip(objs, centers, strict=True):
                o.center = c
            break
    if kind == "single":
        o = objs[0]
        caption = rng.choice([
            f"{_phrase(rng, o, size=True)} {REGION_PHRASES[o.region]}",
            f"{_phrase(rng, o, size=True)}",
            f"{_phrase(rng, o, size=False)} {REGION_PHRASES[o.region]}",
            f"{_phrase(rng, o, size=False, article=False)}, {o.region}",
        ])
    elif kind == "count":
        o = objs[0]
        caption = f"{NUMBERS[len(objs)]} {o.color} {rng.choice(SYNONYMS[o.shape])}{'es' if o.shape == 'box' else 's'}"
        caption = caption.replace("boxs", "boxes")
    elif kind == "pair":
        caption = f"{_phrase(rng, objs[0], size=rng.random() < 0.3)} and {_phrase(rng, objs[1], size=False)}"
    else:
        caption = f"{_phrase(rng, objs[0], size=False)} {relation} {_phrase(rng, objs[1], size=False)}"
    if background != "black" and rng.random() < 0.5:
        caption += f" on a {background} background"
    return Scene(objs, background, caption, kind, relation)


def language_caption(scene: Scene, i: int, seed: int = 0, half: lang.Half = "train", always: bool = False) -> str:
    """builtin:shapes-language's caption of scene i: the template caption half the time, otherwise the same
    scene said in the train half of data.shapes_language (synonyms, digits never, frames, word orders).
    Its own random stream, so the scene itself is exactly builtin:shapes' item i. ``half="held_out"`` and
    ``always``: the scene said in the held-out half, never the template (what no training caption says)."""
    rng = random.Random(f"language:{seed}:{i}")
    if rng.random() < 0.5 and not always:
        return scene.caption
    objs = scene.objects
    if scene.kind == "single":
        o = objs[0]
        text = lang.phrase_object(rng, half, o.shape, o.color, o.size if rng.random() < 0.5 else None)
        if rng.random() < 0.5:
            text += f" {REGION_PHRASES[o.region]}"
    elif scene.kind == "count":
        text = lang.phrase_object(rng, half, objs[0].shape, objs[0].color, count=len(objs))
    else:
        a, b = (lang.phrase_object(rng, half, o.shape, o.color) for o in objs)
        text = lang.phrase_pair(rng, half, a, b, scene.relation)
    if scene.background != "black" and rng.random() < 0.5:
        text += f" on a {scene.background} background"
    return lang.frame(rng, half, text, plural=scene.kind == "count")


def compose(objects: list[tuple[str, str, str]], rng: random.Random, *, relation: str | None = None,
            background: str = "black", caption: str = "", kind: str = "composed") -> Scene:
    """A scene of exactly these (shape, colour, size) objects, placed as make_scene places them: for a
    relation (two objects), the first is ``relation`` the second. ShapesEval renders its ground truth so."""
    objs = [ShapeObject(shape, color, size, (0.5, 0.5), SIZES[size] * rng.uniform(0.9, 1.1))
            for shape, color, size in objects]
    if relation is not None:
        if len(objs) != 2:
            raise ValueError(f"a relation needs two objects, got {len(objs)}")
        objs[0].center, objs[1].center = _relation_centers(rng, objs[0].radius, objs[1].radius, relation)
    else:
        for _ in range(100):
            centers = _place(rng, [o.radius * EXTENT[o.shape] for o in objs])
            if centers is not None:
                break
        else:
            raise ValueError(f"cannot place {len(objs)} objects of these sizes on the canvas")
        for o, c in zip(objs, centers, strict=True):
            o.center = c
    return Scene(objs, background, caption, kind, relation)


@dataclass
class ShapesDataset:
    """Item i -> (image (3, S, S) in [-1, 1], caption). ``scene(i)`` gives the labels, masks included."""

    size: int = 64
    seed: int = 0
    length: int = 10**9  # effectively infinite; training reads items in order, never repeating
    infinite: bool = True
    class_names: tuple[str, ...] = ()
    source: str = "builtin:shapes"
    language: bool = False  # captions in the train half of data.shapes_language too (builtin:shapes-language)

    def __len__(self) -> int:
        return self.length

    @property
    def num_classes(self) -> int:
        return 0

    @property
    def channels(self) -> int:
        return 3

    def scene(self, i: int) -> tuple[Scene, np.ndarray]:
        scene = make_scene(i, self.seed)
        if self.language:
            scene = replace(scene, caption=language_caption(scene, i, self.seed))
        return scene, render(scene, self.size)

    def batch(self, indices, flips=None) -> tuple[torch.Tensor, None, list[str]]:
        """(images, no labels, captions). Flips are ignored: they would swap left and right in captions."""
        images, captions = [], []
        for i in indices:
            scene, img = self.scene(int(i))
            images.append(torch.from_numpy(img.astype(np.float32) / 127.5 - 1).permute(2, 0, 1))
            captions.append(scene.caption)
        return torch.stack(images), None, captions

    def vocabulary(self) -> frozenset[str]:
        """Every word a caption of this dataset can hold: the templates' (make_scene) and, for
        builtin:shapes-language, the train half of its language (never the held-out half)."""
        # a black background is never named, and counts start at two
        phrases = [*COLORS, *(b for b in BACKGROUNDS if b != "black"), *(NUMBERS[n] for n in NUMBERS if n > 1),
                   *REGION_PHRASES.values(), *RELATIONS, "a an and on background"]
        for key, names in SYNONYMS.items():
            phrases += names
            if key in SHAPES:
                phrases += [n + ("es" if n == "box" else "s") for n in names]
        if self.language:
            phrases += [*lang.vocabulary("train"), "there are"]
        return caption_vocabulary(phrases)

    def render_at(self, indices, size: int) -> torch.Tensor:
        """The same scenes drawn at another size (B, 3, size, size) in [-1, 1]: a super-resolution stage's
        natively small inputs (train/loop.sr_pairs)."""
        return torch.stack([torch.from_numpy(render(make_scene(int(i), self.seed), size).astype(np.float32)
                                             / 127.5 - 1).permute(2, 0, 1) for i in indices])
