"""ShapesEval: does an image show what its prompt asked? GenEval's categories (Ghosh et al. 2023) for
the builtin:shapes world, judged by a deterministic analyzer instead of an object detector.

Categories and what each prompt must show (every prompt describes the whole scene, as the training
captions do, so an extra object is a failure):
  single_object  "a large red circle"                 one object, of that shape
  two_objects    "a red circle and a blue square"      two objects, of those shapes
  counting       "three green stars"                   exactly that many, of that shape
  colors         "a yellow triangle"                   one object, of that shape and colour
  position       "a red circle above a blue square"    both (shape and colour), in that relation
  color_attr     "a pink star and a cyan circle"       two objects, each shape in its own colour

The set is fixed by (per_category, seed); prompt k of a category is generated with seed + k. The
analyzer is proven on ground truth (the dataset's renderer drawing exactly what each prompt says) before
it judges a model: tests/unit/test_shapes_eval.py. Overall is the mean of the category accuracies, as in
GenEval; each comes with its binomial standard error."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal, get_args

import numpy as np
from PIL import Image

from imagine.data import shapes_language as lang
from imagine.data.shapes import COLORS, NUMBERS, RELATIONS, SHAPES, compose, render, with_article
from imagine.evaluation.shapes_analyzer import Detected, analyze
from imagine.pipelines.request import Request, run

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")


@dataclass(frozen=True)
class Want:
    shape: str
    color: str  # named in the prompt (and drawn in the ground truth)
    count: int = 1
    judge_color: bool = True  # single_object and two_objects judge shapes only, as GenEval judges classes
    size: str = "small"  # ground truth only

    def matches(self, d: Detected) -> bool:
        return d.shape == self.shape and (not self.judge_color or d.color == self.color)

    def describe(self) -> str:
        color = f"{self.color} " if self.judge_color else ""
        return f"{self.count} {color}{self.shape}{'s' if self.count > 1 else ''}"


@dataclass(frozen=True)
class EvalPrompt:
    category: str
    prompt: str
    wants: tuple[Want, ...]
    relation: str | None  # position: wants[0] <relation> wants[1]
    seed: int  # of the generated image, and of the ground-truth layout


@dataclass(frozen=True)
class Verdict:
    category: str
    prompt: str
    seed: int
    ok: bool
    reason: str  # why it failed ("" when it passed)
    found: str  # what the analyzer saw


Phrasing = Literal["template", "in_vocabulary", "held_out"]
PHRASINGS: tuple[str, ...] = get_args(Phrasing)


def prompt_set(per_category: int = 25, seed: int = 0, phrasing: Phrasing = "template") -> list[EvalPrompt]:
    """The fixed prompt set: ``per_category`` prompts of each category, deterministic in ``seed``.

    phrasing: "template" says each prompt in builtin:shapes' own caption words (the figures so far);
    "in_vocabulary" and "held_out" say the very same scenes (same wants, same seeds) in the train or the
    held-out half of data.shapes_language: other synonyms, frames and word orders."""
    if not 1 <= per_category <= 1000:
        raise ValueError(f"per_category must lie in [1, 1000], got {per_category}")
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing {phrasing!r} unknown; choose one of: {', '.join(PHRASINGS)}")
    prompts = _template_set(per_category, seed)
    if phrasing == "template":
        return prompts
    half = "train" if phrasing == "in_vocabulary" else "held_out"
    return [replace(p, prompt=rephrase(p, half)) for p in prompts]


def rephrase(p: EvalPrompt, half: str) -> str:
    """The prompt's scene in words of one half of the shapes language, chosen by its seed."""
    rng = random.Random(f"{half}:{p.category}:{p.seed}")
    if p.category == "single_object":
        text = lang.phrase_object(rng, half, p.wants[0].shape, p.wants[0].color, p.wants[0].size)
    elif p.category in ("colors", "counting"):
        text = lang.phrase_object(rng, half, p.wants[0].shape, p.wants[0].color, count=p.wants[0].count)
    else:
        a, b = (lang.phrase_object(rng, half, w.shape, w.color) for w in p.wants)
        text = lang.phrase_pair(rng, half, a, b, p.relation)
    return lang.frame(rng, half, text, plural=p.category == "counting")


def _template_set(per_category: int, seed: int) -> list[EvalPrompt]:
    out = []
    colors = list(COLORS)
    for c, category in enumerate(CATEGORIES):
        for k in range(per_category):
            rng = random.Random(seed * 1_000_003 + c * 10_007 + k)
            image_seed = seed * 100_000 + c * 1_000 + k
            if category == "single_object":
                shape, color, size = rng.choice(SHAPES), rng.choice(colors), rng.choice(["small", "large"])
                text = with_article(f"{size} {color} {shape}")
                wants = (Want(shape, color, judge_color=False, size=size),)
            elif category == "colors":
                shape, color = rng.choice(SHAPES), rng.choice(colors)
                text = with_article(f"{color} {shape}")
                wants = (Want(shape, color, size=rng.choice(["small", "large"])),)
            elif category == "counting":
                shape, color, n = rng.choice(SHAPES), rng.choice(colors), rng.randint(2, 4)
                text, wants = f"{NUMBERS[n]} {color} {shape}s", (Want(shape, color, n),)
            else:  # two objects of different shapes and colours
                (s1, s2), (c1, c2) = rng.sample(SHAPES, 2), rng.sample(colors, 2)
                judge = category != "two_objects"
                wants = (Want(s1, c1, judge_color=judge), Want(s2, c2, judge_color=judge))
                text = f"{with_article(f'{c1} {s1}')} and {with_article(f'{c2} {s2}')}"
                if category == "position":
                    relation = rng.choice(RELATIONS)
                    text = f"{with_article(f'{c1} {s1}')} {relation} {with_article(f'{c2} {s2}')}"
                    out.append(EvalPrompt(category, text, wants, relation, image_seed))
                    continue
            out.append(EvalPrompt(category, text, wants, None, image_seed))
    return out


def _found(detected: list[Detected]) -> str:
    return ", ".join(f"{d.color} {d.shape} at ({d.center[0]:.2f}, {d.center[1]:.2f})" for d in detected) or "nothing"


def relation_holds(a: Detected, b: Detected, relation: str) -> bool:
    """a <relation> b on the centres (y down): the offset along the relation's axis points the right way
    and is larger than the offset across it."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]  # from a to b
    main, cross = {"above": (dy, dx), "below": (-dy, dx), "to the left of": (dx, dy),
                   "to the right of": (-dx, dy)}[relation]
    return main > 0.05 and abs(main) > abs(cross)


def judge(p: EvalPrompt, image: np.ndarray) -> Verdict:
    """Does ``image`` ((H, W, 3) uint8) show what ``p`` asks? With the reason when it does not."""
    detected = analyze(image)
    found = _found(detected)

    def verdict(reason: str) -> Verdict:
        return Verdict(p.category, p.prompt, p.seed, not reason, reason, found)

    expected = sum(w.count for w in p.wants)
    if len(detected) != expected:
        return verdict(f"expected {expected} object{'s' * (expected > 1)}, found {len(detected)}: {found}")
    for want in p.wants:
        have = [d for d in detected if want.matches(d)]
        if len(have) != want.count:
            return verdict(f"expected {want.describe()}, found {len(have)}: {found}")
    if p.relation is not None:
        a = next(d for d in detected if p.wants[0].matches(d))
        b = next(d for d in detected if p.wants[1].matches(d))
        if not relation_holds(a, b, p.relation):
            return verdict(f"the {a.color} {a.shape} is not {p.relation} the {b.color} {b.shape}: {found}")
    return verdict("")


ANALYZER_SIZE = 64  # the size the analyzer's thresholds were set at


def ground_truth(p: EvalPrompt, size: int = 64) -> np.ndarray:
    """The dataset's renderer drawing exactly what ``p`` says (layout from p.seed): (size, size, 3) uint8."""
    rng = random.Random(p.seed)
    objects = [(w.shape, w.color, w.size) for w in p.wants for _ in range(w.count)]
    return render(compose(objects, rng, relation=p.relation, caption=p.prompt), size)


@dataclass
class Report:
    verdicts: list[Verdict]

    def categories(self) -> dict[str, float]:
        out = {}
        for category in CATEGORIES:
            mine = [v.ok for v in self.verdicts if v.category == category]
            if mine:
                out[category] = sum(mine) / len(mine)
        return out

    def stderr(self) -> dict[str, float]:
        """Binomial standard error per category, and of the overall mean."""
        out = {}
        for category, acc in self.categories().items():
            n = sum(v.category == category for v in self.verdicts)
            out[category] = math.sqrt(acc * (1 - acc) / n)
        k = len(out)
        out["overall"] = math.sqrt(sum(e**2 for e in out.values())) / k if k else 0.0
        return out

    @property
    def overall(self) -> float:
        cats = self.categories()
        return sum(cats.values()) / len(cats) if cats else 0.0

    def to_json(self) -> dict:
        return {"overall": self.overall, "categories": self.categories(), "stderr": self.stderr(),
                "n": len(self.verdicts), "verdicts": [asdict(v) for v in self.verdicts]}

    def table(self) -> str:
        err = self.stderr()
        lines = [f"{'category':<14} {'accuracy':>9} {'± s.e.':>7} {'n':>4}"]
        for category, acc in self.categories().items():
            n = sum(v.category == category for v in self.verdicts)
            lines.append(f"{category:<14} {acc:>9.3f} {err[category]:>7.3f} {n:>4}")
        lines.append(f"{'overall':<14} {self.overall:>9.3f} {err['overall']:>7.3f} {len(self.verdicts):>4}")
        return "\n".join(lines)


def evaluate(prompts: Sequence[EvalPrompt], make_images: Callable[[list[EvalPrompt]], np.ndarray],
             batch: int = 8, progress: Callable[[int], None] | None = None) -> Report:
    """Judge ``make_images(prompts) -> (N, H, W, 3) uint8`` over the set, ``batch`` prompts at a time. The
    analyzer's areas are calibrated on 64 px scenes: larger images (a cascade's, hires fix's) are downsampled
    to 64 px (Lanczos) first."""
    verdicts = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start:start + batch])
        for p, image in zip(chunk, make_images(chunk), strict=True):
            if max(image.shape[:2]) > ANALYZER_SIZE:
                image = np.asarray(Image.fromarray(image).resize((ANALYZER_SIZE, ANALYZER_SIZE), Image.LANCZOS))
            verdicts.append(judge(p, image))
        if progress is not None:
            progress(len(chunk))
    return Report(verdicts)


def evaluate_model(model, text_encoder, prompts: Sequence[EvalPrompt], settings, rerank: int = 1, scorer=None,
                   progress: Callable[[int], None] | None = None) -> Report:
    """ShapesEval of a text-to-image model: one image per prompt, made with ``settings`` (a pipelines
    Settings; its prompt and seed are each prompt's), or the best of ``rerank`` candidates by ``scorer``."""
    def make_images(chunk):
        images = []
        for p in chunk:
            request = Request("txt2img", replace(settings, prompt=p.prompt, seed=p.seed, n=1), rerank=rerank)
            images.append(run(request, model, text_encoder, scorer=scorer)[0].pixels)
        return np.stack(images)

    return evaluate(prompts, make_images, progress=progress)
