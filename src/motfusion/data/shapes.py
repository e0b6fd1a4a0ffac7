"""The built-in "shapes" world: procedurally rendered scenes with true captions.

A scene is 1-3 flat-colored shapes (circle, square, triangle) on a black
background. Every caption is generated from the scene it describes, so it is
true by construction, and it follows a small grammar that
`motfusion.evaluation.shapes_eval.parse_caption` reads back:

    caption  := part | part " and " part | part ", " part " and " part
    part     := mention | mention RELATION mention
    mention  := ("a" | "two" | "three") [size] color shape[s] [position]

Everything is a pure function of its seed: `ShapesDataset.sample(index)` draws
from a numpy Generator seeded by (seed, split, index), so the dataset is
infinite, reproducible and needs no storage.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch

from motfusion.data.images import from_uint8

BACKGROUND = (0, 0, 0)
# Corners of the RGB cube plus X11 purple: every pair is at least 164/255 apart,
# and every color is at least 255/255 from the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (160, 32, 240),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Bounding-box side as a fraction of the image side: 9 px and 13 px at 32 px.
# Large is kept at 13 px so that two or three large objects still fit side by side.
SIZE_FRACTION = {"small": 0.28, "large": 0.42}
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATIONS = ("above", "below", "left of", "right of")
# A caption only states a position or relation that holds with this margin (in
# image fractions); the checker accepts a smaller one, so captions always check.
CAPTION_REGION_MARGIN = 0.15
CAPTION_RELATION_MARGIN = 0.2
MAX_CAPTION_CHARS = 59
FORMS = ("single_object", "single_size", "position", "multi_object", "counting", "relation")


@dataclass(frozen=True)
class ShapeObject:
    """One object; (x, y) is the center of its bounding box in [0, 1] image coordinates."""

    shape: str
    color: str
    size: str
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    image_size: int


@dataclass(frozen=True)
class Mention:
    """A noun phrase of a caption, e.g. "a small red circle on the left" or "two blue squares"."""

    shape: str
    color: str
    count: int = 1
    size: str | None = None
    position: str | None = None

    def matches(self, obj: ShapeObject) -> bool:
        return (
            obj.shape == self.shape
            and obj.color == self.color
            and (self.size is None or obj.size == self.size)
        )


@dataclass(frozen=True)
class Relation:
    """A spatial relation between two singular mentions: "<subject> <relation> <object>"."""

    subject: Mention
    relation: str
    object: Mention


Part = Mention | Relation


@dataclass(frozen=True)
class ShapesSample:
    image: torch.Tensor  # float32, 3 x H x W, in [-1, 1]
    caption: str
    scene: Scene


# ---------------------------------------------------------------------------- geometry


def diameter(size: str, image_size: int) -> int:
    """Bounding-box side in pixels; always odd so that triangles are symmetric."""
    return 2 * int(SIZE_FRACTION[size] * image_size / 2) + 1


def box(obj: ShapeObject, image_size: int) -> tuple[int, int, int]:
    """Top-left corner and side in pixels, as `render` draws the object."""
    d = diameter(obj.size, image_size)
    return round(obj.x * image_size - d / 2), round(obj.y * image_size - d / 2), d


def border_margin(image_size: int) -> int:
    """Minimum distance between an object and the image border."""
    return max(1, image_size // 32)


def object_gap(image_size: int) -> int:
    """Minimum distance between two bounding boxes, so objects never touch."""
    return max(1, round(image_size / 16))


@functools.lru_cache(maxsize=512)
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of `shape` filling a width x height box.

    Pixel centers are tested in box coordinates u, v in (-1, 1). The triangle
    points up; its half-pixel slack gives a one-pixel apex and a full-width base.
    """
    u = (np.arange(width) + 0.5) / width * 2 - 1
    v = (np.arange(height) + 0.5) / height * 2 - 1
    uu, vv = np.meshgrid(u, v)
    if shape == "circle":
        mask = uu**2 + vv**2 <= 1
    elif shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "triangle":
        mask = np.abs(uu) <= (vv + 1) / 2 + 1 / width
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.flags.writeable = False
    return mask


def in_region(obj: ShapeObject, region: str, margin: float) -> bool:
    """Whether `obj` is on the `region` side of the image, by at least `margin`."""
    dx, dy = obj.x - 0.5, obj.y - 0.5
    return {
        "left": dx < -margin,
        "right": dx > margin,
        "top": dy < -margin,
        "bottom": dy > margin,
        "center": max(abs(dx), abs(dy)) < 0.25 - margin,
    }[region]


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str, margin: float) -> bool:
    """Whether "a <relation> b" holds with at least `margin` between the centers (y points down)."""
    return {
        "above": b.y - a.y > margin,
        "below": a.y - b.y > margin,
        "left of": b.x - a.x > margin,
        "right of": a.x - b.x > margin,
    }[relation]


# ---------------------------------------------------------------------------- scenes


def _place(
    rng: np.random.Generator, image_size: int, diameters: list[int], gap: int
) -> list[tuple[int, int]] | None:
    """Top-left corners for boxes of the given sides, uniform over non-overlapping spots.

    Each box is drawn uniformly among the positions that keep `gap` pixels to the boxes
    already placed; returns None when some box has nowhere to go.
    """
    lo = border_margin(image_size)
    corners: list[tuple[int, int]] = []
    for d in diameters:
        starts = np.arange(lo, image_size - lo - d + 1)
        free = np.ones((starts.size, starts.size), dtype=bool)  # [y, x]
        for (bx, by), bd in zip(corners, diameters):
            clear_x = (starts + d + gap <= bx) | (starts >= bx + bd + gap)
            clear_y = (starts + d + gap <= by) | (starts >= by + bd + gap)
            free &= clear_y[:, None] | clear_x[None, :]
        candidates = np.flatnonzero(free)
        if candidates.size == 0:
            return None
        k = int(candidates[rng.integers(candidates.size)])
        corners.append((int(starts[k % starts.size]), int(starts[k // starts.size])))
    return corners


def _sample_kinds(rng: np.random.Generator, n_objects: int, duplicate_prob: float) -> list[tuple[str, str]]:
    """(shape, color) per object: all distinct, except that with `duplicate_prob`
    two or more objects share one kind, which the caption then counts."""
    kinds = [(s, c) for s in SHAPES for c in COLORS]
    picked = [kinds[i] for i in rng.choice(len(kinds), size=n_objects, replace=False)]
    if n_objects >= 2 and rng.random() < duplicate_prob:
        k = int(rng.integers(2, n_objects + 1))
        picked[:k] = [picked[0]] * k
    return picked


def random_scene(
    rng: np.random.Generator,
    image_size: int = 32,
    n_objects: int = 1,
    duplicate_prob: float = 0.3,
    gap: int | None = None,
) -> Scene:
    """A scene of `n_objects` non-overlapping objects, fully inside the image, their boxes at least
    `gap` pixels apart (None: object_gap(image_size))."""
    gap = object_gap(image_size) if gap is None else gap
    kinds = _sample_kinds(rng, n_objects, duplicate_prob)
    for _ in range(1000):
        sizes = [SIZES[i] for i in rng.integers(len(SIZES), size=n_objects)]
        diameters = [diameter(s, image_size) for s in sizes]
        corners = _place(rng, image_size, diameters, gap)
        if corners is not None:
            break
    else:
        raise RuntimeError(f"cannot fit {n_objects} objects into {image_size}px")
    objects = tuple(
        ShapeObject(shape, color, size, (x0 + d / 2) / image_size, (y0 + d / 2) / image_size)
        for (shape, color), size, d, (x0, y0) in zip(kinds, sizes, diameters, corners)
    )
    return Scene(objects, image_size)


def render(scene: Scene) -> torch.Tensor:
    """Crisp rendering of `scene` as a float32 3 x H x W tensor in [-1, 1]."""
    n = scene.image_size
    pixels = np.empty((n, n, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    for obj in scene.objects:
        d = diameter(obj.size, n)
        x0 = min(max(round(obj.x * n - d / 2), 0), n - d)
        y0 = min(max(round(obj.y * n - d / 2), 0), n - d)
        pixels[y0 : y0 + d, x0 : x0 + d][shape_mask(obj.shape, d, d)] = PALETTE[obj.color]
    return from_uint8(pixels).permute(2, 0, 1).contiguous()  # (3, n, n)


# ---------------------------------------------------------------------------- captions


def mention_text(m: Mention) -> str:
    noun = m.shape if m.count == 1 else m.shape + "s"
    words = [NUMBER_WORDS[m.count], m.size, m.color, noun, POSITION_PHRASES.get(m.position)]
    return " ".join(w for w in words if w)


def part_text(p: Part) -> str:
    if isinstance(p, Relation):
        return f"{mention_text(p.subject)} {p.relation} {mention_text(p.object)}"
    return mention_text(p)


def caption_text(parts: tuple[Part, ...]) -> str:
    phrases = [part_text(p) for p in parts]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _clear_relation(a: ShapeObject, b: ShapeObject) -> str | None:
    """The relation of a to b along the axis where they are clearly apart, if any."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dy) >= max(abs(dx), CAPTION_RELATION_MARGIN):
        return "above" if dy > 0 else "below"
    if abs(dx) >= CAPTION_RELATION_MARGIN:
        return "left of" if dx > 0 else "right of"
    return None


def _mention(obj: ShapeObject, rng: np.random.Generator, size_prob: float, position_prob: float) -> Mention:
    size = obj.size if rng.random() < size_prob else None
    regions = [r for r in POSITION_PHRASES if in_region(obj, r, CAPTION_REGION_MARGIN)]
    position = None
    if regions and rng.random() < position_prob:
        position = regions[int(rng.integers(len(regions)))]
    return Mention(obj.shape, obj.color, size=size, position=position)


def _strip(part: Part, detail: str) -> tuple[Part, ...] | None:
    """`part` without its `detail` ("position", "size" or "relation"); None if it has none."""
    if isinstance(part, Relation):
        if detail == "relation":
            return part.subject, part.object
        if detail == "size" and (part.subject.size or part.object.size):
            plain = (replace(part.subject, size=None), replace(part.object, size=None))
            return (Relation(plain[0], part.relation, plain[1]),)
        return None
    if detail != "relation" and getattr(part, detail) is not None:
        return (replace(part, **{detail: None}),)
    return None


def _simplify(parts: tuple[Part, ...]) -> tuple[Part, ...]:
    """Drops the least essential detail: a position, then a size, then a relation."""
    for detail in ("position", "size", "relation"):
        for i, part in enumerate(parts):
            stripped = _strip(part, detail)
            if stripped is not None:
                return parts[:i] + stripped + parts[i + 1 :]
    return parts


def describe(
    scene: Scene,
    rng: np.random.Generator,
    size_prob: float = 0.5,
    position_prob: float = 0.5,
    relation_prob: float = 0.7,
) -> tuple[Part, ...]:
    """A true, complete description of `scene`: every object is covered by one mention.

    Objects of the same shape and color become one counted mention ("two red
    circles"); other objects may get their size, a clear absolute position, or
    be paired by a clear relation. Details are dropped until the text fits.
    """
    groups: dict[tuple[str, str], list[ShapeObject]] = {}
    for obj in scene.objects:
        groups.setdefault((obj.shape, obj.color), []).append(obj)
    parts: list[Part] = [Mention(s, c, count=len(objs)) for (s, c), objs in groups.items() if len(objs) > 1]
    singles = [objs[0] for objs in groups.values() if len(objs) == 1]
    if len(singles) >= 2 and rng.random() < relation_prob:
        i, j = (int(k) for k in rng.choice(len(singles), size=2, replace=False))
        relation = _clear_relation(singles[i], singles[j])
        if relation is not None:
            subject = _mention(singles[i], rng, size_prob, position_prob=0.0)
            obj = _mention(singles[j], rng, size_prob, position_prob=0.0)
            parts.append(Relation(subject, relation, obj))
            singles = [o for k, o in enumerate(singles) if k not in (i, j)]
    parts.extend(_mention(o, rng, size_prob, position_prob) for o in singles)
    result = tuple(parts[int(k)] for k in rng.permutation(len(parts)))
    while len(caption_text(result)) > MAX_CAPTION_CHARS:
        result = _simplify(result)
    return result


def caption_for(scene: Scene, rng: np.random.Generator) -> str:
    return caption_text(describe(scene, rng))


def caption_form(parts: tuple[Part, ...]) -> str:
    """The most specific GenEval-style task a caption exercises (one of FORMS)."""
    mentions = [m for p in parts for m in ((p.subject, p.object) if isinstance(p, Relation) else (p,))]
    if any(isinstance(p, Relation) for p in parts):
        return "relation"
    if any(m.count > 1 for m in mentions):
        return "counting"
    if any(m.position for m in mentions):
        return "position"
    if len(mentions) > 1:
        return "multi_object"
    return "single_size" if mentions[0].size else "single_object"


# ---------------------------------------------------------------------------- dataset


class ShapesDataset:
    """An infinite, deterministic stream of (image, caption, scene) samples.

    Sample `index` of split `split` depends only on (seed, split, index); other
    splits use disjoint seed streams. The number of objects is 1 with
    probability `single_object_prob`, otherwise uniform over 2..max_objects
    (see `object_count_probs`), their boxes `gap` pixels apart or more
    (None: `object_gap(image_size)`). A caption states each object's size with
    probability `size_prob`, and its position, where one is clear, with
    probability `position_prob` (DALL-E 3 trains on descriptive captions for
    better prompt following).
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        seed: int = 0,
        split: str = "train",
        max_objects: int = 3,
        single_object_prob: float = 0.5,
        duplicate_prob: float = 0.3,
        size_prob: float = 0.5,
        position_prob: float = 0.5,
        gap: int | None = None,
    ):
        if not 1 <= max_objects <= 3:
            raise ValueError("max_objects must be 1, 2 or 3 (captions must stay short)")
        if max_objects == 1:
            single_object_prob = 1.0
        self.image_size = image_size
        self.seed = seed
        self.split = split
        self.max_objects = max_objects
        self.duplicate_prob, self.gap = duplicate_prob, gap
        self.size_prob, self.position_prob = size_prob, position_prob
        rest = (1 - single_object_prob) / max(max_objects - 1, 1)
        self.object_count_probs = (single_object_prob,) + (rest,) * (max_objects - 1)

    def _rng(self, index: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        stream = zlib.crc32(self.split.encode())
        return np.random.default_rng(np.random.SeedSequence([self.seed, stream, index]))

    def draw(self, index: int) -> tuple[Scene, tuple[Part, ...]]:
        """The scene and structured caption of sample `index`, without rendering."""
        rng = self._rng(index)
        n_objects = 1 + int(rng.choice(self.max_objects, p=self.object_count_probs))
        scene = random_scene(rng, self.image_size, n_objects, self.duplicate_prob, self.gap)
        return scene, describe(scene, rng, self.size_prob, self.position_prob)

    def sample(self, index: int) -> ShapesSample:
        scene, parts = self.draw(index)
        return ShapesSample(render(scene), caption_text(parts), scene)


def single_object_prompts(n: int, seed: int = 0, image_size: int = 32) -> list[tuple[str, Scene]]:
    """`n` single-object val captions, each with the scene it was written for."""
    ds = ShapesDataset(image_size=image_size, seed=seed, split="val", single_object_prob=1.0)
    return [(caption_text(parts), scene) for scene, parts in map(ds.draw, range(n))]


def eval_prompts(n: int, seed: int = 0, image_size: int = 32) -> list[tuple[str, Scene]]:
    """`n` val captions with their scenes, balanced over FORMS and grouped by form in that order."""
    ds = ShapesDataset(image_size=image_size, seed=seed, split="val")
    quota = {form: n // len(FORMS) + (i < n % len(FORMS)) for i, form in enumerate(FORMS)}
    buckets: dict[str, list[tuple[str, Scene]]] = {form: [] for form in FORMS}
    index = 0
    while any(len(buckets[f]) < quota[f] for f in FORMS):
        scene, parts = ds.draw(index)
        bucket = buckets[caption_form(parts)]
        if len(bucket) < quota[caption_form(parts)]:
            bucket.append((caption_text(parts), scene))
        index += 1
    return [prompt for form in FORMS for prompt in buckets[form]]
