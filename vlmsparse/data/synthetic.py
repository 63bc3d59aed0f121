"""Synthetic scenes: coloured shapes on a 2 x 2 grid, with captions and single-word VQA questions.

A scene holds 1 to 3 objects; every object has a colour (red, green, blue, yellow), a shape (circle,
square, triangle) and a cell of the 2 x 2 grid (top/bottom x left/right). Within one scene colours are
distinct and shapes are distinct, so "the red shape" and "the circle" name one object.

Questions (one word answers):

- colour:   "what color is the circle?"                       -> "red"
- shape:    "what shape is the red object?"                   -> "circle"
- count:    "how many shapes are there?"                      -> "one" | "two" | "three"
- position: "is the red circle on the left or the right?"     -> "left" | "right"
            "is the red circle at the top or the bottom?"     -> "top" | "bottom"
- presence: "is there a blue square?"                         -> "yes" | "no" (balanced)

Everything is drawn from ``random.Random`` seeded by the caller, so the same seed gives the same images
and texts. The train / held-out split is fixed by the scene *layout* (which objects in which cells, without
the pixel jitter): a stable hash puts 20% of all 1056 layouts in the held-out split, so held-out scenes
are combinations the model never saw in training.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from itertools import combinations, permutations

from PIL import Image, ImageDraw

__all__ = [
    "DATA_VERSION",
    "COLORS",
    "SHAPES",
    "CELLS",
    "SPLITS",
    "SceneObject",
    "Scene",
    "VQASample",
    "all_layouts",
    "scene_split",
    "random_scene",
    "render_scene",
    "caption_scene",
    "question_for",
    "make_vqa_samples",
    "synthetic_captions",
    "vocabulary",
    "export_vqa_jsonl",
    "QUESTION_KINDS",
]

# Bump whenever the scenes, images, questions or answers this module generates change: the demo's cached
# model is keyed on it, so a changed generator retrains instead of reusing a model trained on other data.
DATA_VERSION = 1

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# (row, col): row 0 = top, col 0 = left
CELLS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (1, 0), (1, 1))
CELL_NAMES = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
NUMBER_WORDS = ("zero", "one", "two", "three")
QUESTION_KINDS: tuple[str, ...] = ("color", "shape", "count", "position", "presence")
SPLITS: tuple[str, ...] = ("train", "heldout")
HELDOUT_PERCENT = 20
MAX_OBJECTS = 3


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    cell: tuple[int, int]


@dataclass(frozen=True)
class Scene:
    """A layout: objects sorted by cell (so equal layouts compare equal)."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"Scene: objects must hold 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        for field_name in ("color", "shape", "cell"):
            values = [getattr(o, field_name) for o in self.objects]
            if len(set(values)) != len(values):
                raise ValueError(f"Scene: every object needs a distinct {field_name}, got {values}")
        for o in self.objects:
            if o.color not in COLORS or o.shape not in SHAPES or o.cell not in CELLS:
                raise ValueError(f"Scene: unknown object {o} (colors {list(COLORS)}, shapes {list(SHAPES)}, cells {CELLS})")

    def key(self) -> str:
        return ";".join(f"{o.color}-{o.shape}-{o.cell[0]}{o.cell[1]}" for o in sorted(self.objects, key=lambda o: o.cell))


@dataclass(frozen=True)
class VQASample:
    """One image with one question and its single-word answer; ``kind`` in :data:`QUESTION_KINDS`."""

    image: Image.Image
    question: str
    answer: str
    kind: str
    scene: Scene


# ---------------------------------------------------------------------------------------------- layouts
def all_layouts() -> list[Scene]:
    """Every distinct layout (1056 of them), in a fixed order."""
    layouts = []
    for k in range(1, MAX_OBJECTS + 1):
        for cells in combinations(CELLS, k):
            for colors in permutations(COLORS, k):
                for shapes in permutations(SHAPES, k):
                    layouts.append(Scene(tuple(SceneObject(c, s, p) for c, s, p in zip(colors, shapes, cells))))
    return layouts


def scene_split(scene: Scene) -> str:
    """``"heldout"`` for a fixed 20% of layouts (stable hash of the layout), else ``"train"``."""
    digest = hashlib.sha256(scene.key().encode()).digest()
    return "heldout" if int.from_bytes(digest[:4], "little") % 100 < HELDOUT_PERCENT else "train"


_LAYOUTS_BY_SPLIT: dict[str, list[Scene]] = {}


def _layouts(split: str) -> list[Scene]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not _LAYOUTS_BY_SPLIT:
        for scene in all_layouts():
            _LAYOUTS_BY_SPLIT.setdefault(scene_split(scene), []).append(scene)
    return _LAYOUTS_BY_SPLIT[split]


def random_scene(rng: random.Random, split: str = "train") -> Scene:
    """A layout of ``split`` with a uniformly drawn object count, then a uniform layout of that count."""
    layouts = _layouts(split)
    k = rng.randint(1, MAX_OBJECTS)
    return rng.choice([s for s in layouts if len(s.objects) == k])


# ---------------------------------------------------------------------------------------------- drawing
def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw ``scene`` as an RGB ``image_size`` x ``image_size`` image: light grey background of a random
    shade, each object 72-82% of its cell wide, near its centre (+-5% of the cell), its colour jittered by +-10."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    shade = rng.randint(225, 235)
    image = Image.new("RGB", (image_size, image_size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    cell = image_size / 2
    for obj in scene.objects:
        size = cell * rng.uniform(0.72, 0.82)
        x0 = obj.cell[1] * cell + (cell - size) / 2 + rng.uniform(-0.05, 0.05) * cell
        y0 = obj.cell[0] * cell + (cell - size) / 2 + rng.uniform(-0.05, 0.05) * cell
        x1, y1 = x0 + size, y0 + size
        color = tuple(max(0, min(255, v + rng.randint(-10, 10))) for v in COLORS[obj.color])
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=color)
        elif obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=color)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    return image


def caption_scene(scene: Scene) -> str:
    """E.g. ``"a red circle at the top left and a blue square at the bottom right."``"""
    parts = [f"a {o.color} {o.shape} at the {CELL_NAMES[o.cell]}" for o in scene.objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


# -------------------------------------------------------------------------------------------- questions
def question_for(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """One ``(question, answer)`` of ``kind`` about ``scene``."""
    objects = scene.objects
    if kind == "color":
        o = rng.choice(objects)
        return f"what color is the {o.shape}?", o.color
    if kind == "shape":
        o = rng.choice(objects)
        return f"what shape is the {o.color} object?", o.shape
    if kind == "count":
        return "how many shapes are there?", NUMBER_WORDS[len(objects)]
    if kind == "position":
        o = rng.choice(objects)
        if rng.random() < 0.5:
            return f"is the {o.color} {o.shape} on the left or the right?", ("left", "right")[o.cell[1]]
        return f"is the {o.color} {o.shape} at the top or the bottom?", ("top", "bottom")[o.cell[0]]
    if kind == "presence":
        present = {(o.color, o.shape) for o in objects}
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(present))
            return f"is there a {color} {shape}?", "yes"
        # a near miss: shares the colour or the shape of an object in the scene
        o = rng.choice(objects)
        misses = [(o.color, s) for s in SHAPES] + [(c, o.shape) for c in COLORS]
        color, shape = rng.choice([m for m in misses if m not in present])
        return f"is there a {color} {shape}?", "no"
    raise ValueError(f"question kind must be one of {QUESTION_KINDS}, got {kind!r}")


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def make_vqa_samples(n: int, seed: int = 0, split: str = "train", image_size: int = 32,
                     kinds: tuple[str, ...] = QUESTION_KINDS) -> list[VQASample]:
    """``n`` samples of ``split`` (question kinds in turn, so every kind gets n/len(kinds)); deterministic
    for ``(seed, split, image_size)``. Train and held-out samples never share a layout."""
    _check_n(n)
    for kind in kinds:
        if kind not in QUESTION_KINDS:
            raise ValueError(f"kinds: unknown question kind {kind!r} (allowed: {QUESTION_KINDS})")
    rng = random.Random(f"vqa-{seed}-{split}")
    samples = []
    for i in range(n):
        scene = random_scene(rng, split)
        kind = kinds[i % len(kinds)]
        question, answer = question_for(scene, kind, rng)
        samples.append(VQASample(render_scene(scene, image_size, rng), question, answer, kind, scene))
    return samples


def synthetic_captions(n: int, seed: int = 0, image_size: int = 336) -> list[tuple[Image.Image, str]]:
    """``n`` (image, caption) pairs of coloured shapes, deterministic for ``seed`` (train-split layouts),
    e.g. for pruning calibration."""
    _check_n(n)
    rng = random.Random(f"captions-{seed}")
    out = []
    for _ in range(n):
        scene = random_scene(rng, "train")
        out.append((render_scene(scene, image_size, rng), caption_scene(scene)))
    return out


def vocabulary() -> list[str]:
    """Every word (lower case) and punctuation mark the captions, questions and answers use."""
    words = set(COLORS) | set(SHAPES) | set(NUMBER_WORDS)
    words |= {"yes", "no", "left", "right", "top", "bottom", "a", "at", "the", "and", "on", "or", "is", "there",
              "what", "color", "shape", "object", "how", "many", "shapes", "are", ".", ",", "?", ":"}
    return sorted(words)


def export_vqa_jsonl(samples: list[VQASample], out_dir: str, name: str = "questions.jsonl",
                     num_answers: int = 10) -> str:
    """Write ``samples`` as PNG images plus a VQA JSONL (``image``, ``question``, ``answers``, ``kind``) in
    ``out_dir``; the answer is repeated ``num_answers`` times (all annotators agree on synthetic scenes, so a
    correct prediction scores VQA accuracy 1). Returns the JSONL path."""
    import json
    import os

    from .._io import atomic_write

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    lines = []
    for i, s in enumerate(samples):
        rel = os.path.join("images", f"{i:05d}.png")
        s.image.save(os.path.join(out_dir, rel))
        lines.append(json.dumps({"image": rel, "question": s.question, "answers": [s.answer] * num_answers,
                                 "kind": s.kind}))
    path = os.path.join(out_dir, name)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    atomic_write(path, write)
    return path
