"""GenEval-style evaluation in the shapes world.

`read_scene` turns an image (rendered or generated) back into objects,
`parse_caption` turns a caption into clauses, and `check` tells which clause
types a scene satisfies. On top of these, `geneval` scores text-to-image
samples and `caption_accuracy` scores image-to-text samples.

Clause semantics follow GenEval: a singular mention asks for at least one
matching object (extra objects are not penalized), a counted mention ("two red
circles") asks for exactly that many objects of its shape and color.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from motfusion.data.edits import EDIT_KINDS, EditTriple
from motfusion.data.shapes import (
    BACKGROUND,
    COLORS,
    NUMBER_WORDS,
    PALETTE,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    Mention,
    Part,
    Relation,
    Scene,
    ShapeObject,
    diameter,
    in_region,
    relation_holds,
    shape_mask,
)

CLAUSE_TYPES = ("color", "shape", "count", "position", "size", "objects")
# Pixels farther than this (RGB in [0, 1], Euclidean) from every palette color
# and from the background are ignored. Palette colors are >= 0.64 apart.
COLOR_THRESHOLD = 0.3
# Looser than the caption margins in shapes.py, so that true captions always check.
CHECK_REGION_MARGIN = 0.1
CHECK_RELATION_MARGIN = 0.1
# An object the edit did not move must be read within this distance (image fractions) of its place.
EDIT_POSITION_TOLERANCE = 0.1


# ---------------------------------------------------------------------------- scene reader


def _color_labels(image: torch.Tensor) -> np.ndarray:
    """Per-pixel index into COLORS, or -1 for background and unrecognized pixels."""
    rgb = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    references = np.array([BACKGROUND] + [PALETTE[c] for c in COLORS], dtype=np.float32) / 255
    dist = np.linalg.norm(rgb[:, :, None, :] - references, axis=-1)
    nearest = dist.argmin(-1)
    known = dist.min(-1) <= COLOR_THRESHOLD
    return np.where(known & (nearest > 0), nearest - 1, -1)


def _components(labels: np.ndarray) -> np.ndarray:
    """Ids of 4-connected regions of equal non-negative label (-1 elsewhere).

    Min-label propagation with pointer jumping: every pixel holds the index of
    some pixel of its region and keeps taking the smallest one in reach.
    """
    h, w = labels.shape
    fg = labels >= 0
    none = h * w
    ids = np.where(fg, np.arange(h * w).reshape(h, w), none)
    down = fg[:-1] & (labels[:-1] == labels[1:])
    right = fg[:, :-1] & (labels[:, :-1] == labels[:, 1:])
    while True:
        new = ids.copy()
        new[1:] = np.minimum(new[1:], np.where(down, ids[:-1], none))
        new[:-1] = np.minimum(new[:-1], np.where(down, ids[1:], none))
        new[:, 1:] = np.minimum(new[:, 1:], np.where(right, ids[:, :-1], none))
        new[:, :-1] = np.minimum(new[:, :-1], np.where(right, ids[:, 1:], none))
        new = np.append(new.ravel(), none)[new]
        if np.array_equal(new, ids):
            return np.where(fg, ids, -1)
        ids = new


def _classify(mask: np.ndarray) -> str:
    """The shape whose template, stretched to the mask's box, overlaps it best (IoU)."""
    h, w = mask.shape

    def iou(shape: str) -> float:
        template = shape_mask(shape, w, h)
        return (mask & template).sum() / (mask | template).sum()

    return max(SHAPES, key=iou)


def read_scene(image: torch.Tensor) -> Scene:
    """Reads objects back from a 3 x H x W image in [-1, 1] (rendered or generated).

    Color is the nearest palette color per pixel, objects are connected
    components per color (tiny ones are noise), shape is the best-matching
    template, size compares the box side to the midpoint of the two rendered
    sizes, and position is the box center.
    """
    _, h, w = image.shape
    n = max(h, w)
    labels = _color_labels(image)
    ids = _components(labels)
    min_area = max(3, round(4 * (n / 32) ** 2))
    size_split = (diameter("small", n) + diameter("large", n)) / 2
    objects = []
    values, counts = np.unique(ids[ids >= 0], return_counts=True)
    for cid, count in zip(values, counts):
        if count < min_area:
            continue
        ys, xs = np.nonzero(ids == cid)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        box = ids[y0:y1, x0:x1] == cid
        side = math.sqrt((x1 - x0) * (y1 - y0))
        objects.append(
            ShapeObject(
                shape=_classify(box),
                color=COLORS[labels[ys[0], xs[0]]],
                size="large" if side > size_split else "small",
                x=float(x0 + x1) / 2 / w,
                y=float(y0 + y1) / 2 / h,
            )
        )
    return Scene(tuple(objects), n)


# ---------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class Clause:
    """One checkable claim; `target` is a Relation only for relational position clauses."""

    type: str
    target: Mention | Relation


@dataclass(frozen=True)
class CaptionSpec:
    parts: tuple[Part, ...]

    @property
    def mentions(self) -> list[Mention]:
        return [m for p in self.parts for m in ((p.subject, p.object) if isinstance(p, Relation) else (p,))]

    @property
    def clauses(self) -> list[Clause]:
        clauses = []
        for m in self.mentions:
            clauses += [Clause("shape", m), Clause("color", m)]
            if m.size:
                clauses.append(Clause("size", m))
            if m.count > 1:
                clauses.append(Clause("count", m))
            if m.position:
                clauses.append(Clause("position", m))
        clauses += [Clause("position", p) for p in self.parts if isinstance(p, Relation)]
        return clauses


_COUNTS = {word: count for count, word in NUMBER_WORDS.items()} | {"an": 1, "one": 1}
_POSITIONS = {phrase: position for position, phrase in POSITION_PHRASES.items()}


def _parse_mention(words: list[str]) -> Mention | None:
    if len(words) < 3 or words[0] not in _COUNTS:
        return None
    count, rest = _COUNTS[words[0]], words[1:]
    size = rest.pop(0) if rest[0] in SIZES else None
    if len(rest) < 2:
        return None
    color, noun, tail = rest[0], rest[1], " ".join(rest[2:])
    if count > 1:
        if not noun.endswith("s"):
            return None
        noun = noun[:-1]
    shape = noun
    position = _POSITIONS.get(tail) if tail else None
    if color not in COLORS or shape not in SHAPES or (tail and position is None):
        return None
    if count > 1 and (size or position):
        return None
    return Mention(shape, color, count, size, position)


def _parse_part(words: list[str]) -> Part | None:
    for i, word in enumerate(words):
        if word in ("above", "below"):
            relation, left, right = word, words[:i], words[i + 1 :]
        elif word in ("left", "right") and words[i + 1 : i + 2] == ["of"]:
            relation, left, right = f"{word} of", words[:i], words[i + 2 :]
        else:
            continue
        subject, obj = _parse_mention(left), _parse_mention(right)
        if subject is None or obj is None or subject.count > 1 or obj.count > 1:
            return None
        if subject.position or obj.position:
            return None
        return Relation(subject, relation, obj)
    return _parse_mention(words)


def parse_caption(text: str) -> CaptionSpec | None:
    """Parses a caption of the shapes grammar; None if any part of it does not parse."""
    text = " ".join(text.lower().strip().rstrip(".").split())
    parts = []
    for chunk in re.split(r" ?, ?(?:and )?| and ", text):
        part = _parse_part(chunk.split())
        if part is None:
            return None
        parts.append(part)
    return CaptionSpec(tuple(parts))


# ---------------------------------------------------------------------------- checking


def _holds(clause: Clause, scene: Scene, demand: Counter) -> bool:
    objects = scene.objects
    target = clause.target
    if isinstance(target, Relation):
        return any(
            a is not b and relation_holds(a, b, target.relation, CHECK_RELATION_MARGIN)
            for a in objects
            if target.subject.matches(a)
            for b in objects
            if target.object.matches(b)
        )
    if clause.type == "shape":
        return sum(o.shape == target.shape for o in objects) >= demand[target.shape]
    same_kind = sum(o.shape == target.shape and o.color == target.color for o in objects)
    if clause.type == "color":
        return same_kind >= demand[target.shape, target.color]
    if clause.type == "count":
        return same_kind == target.count
    if clause.type == "size":
        return any(target.matches(o) for o in objects)
    return any(target.matches(o) and in_region(o, target.position, CHECK_REGION_MARGIN) for o in objects)


def check(spec: CaptionSpec, scene: Scene) -> dict[str, bool]:
    """For each clause type in `spec`, whether all its clauses hold in `scene`.

    Shape and color clauses ask for as many objects as the caption mentions in
    total, so "a red circle and a blue circle" needs two circles. The "objects"
    clause asks for exactly as many objects as the caption mentions: captions of
    this world describe every object, and without it an image of many colored
    fragments would satisfy "a red square" by containing a red fragment.
    """
    demand: Counter = Counter()
    for m in spec.mentions:
        demand[m.shape] += m.count
        demand[m.shape, m.color] += m.count
    result: dict[str, bool] = {}
    for clause in spec.clauses:
        result[clause.type] = result.get(clause.type, True) and _holds(clause, scene, demand)
    result["objects"] = len(scene.objects) == sum(m.count for m in spec.mentions)
    return result


def _summarize(name: str, results: list[dict[str, bool] | None]) -> dict[str, float]:
    """Overall accuracy and, per clause type, accuracy over the items that contain it."""
    n = len(results)
    summary = {name: sum(r is not None and all(r.values()) for r in results) / max(n, 1)}
    for kind in CLAUSE_TYPES:
        having = [r[kind] for r in results if r is not None and kind in r]
        summary[f"{name}/{kind}"] = sum(having) / len(having) if having else float("nan")
    summary["n"] = n
    return summary


def geneval(prompts: list[str], images: list[torch.Tensor]) -> dict[str, float]:
    """Fraction of images that satisfy every clause of their prompt, with a per-clause-type breakdown.

    A clause type absent from all prompts reports NaN.
    """
    results = []
    for prompt, image in zip(prompts, images, strict=True):
        spec = parse_caption(prompt)
        if spec is None:
            raise ValueError(f"prompt outside the shapes grammar: {prompt!r}")
        results.append(check(spec, read_scene(image)))
    return _summarize("geneval", results)


def caption_accuracy(captions: list[str], scenes: list[Scene]) -> dict[str, float]:
    """Fraction of captions that parse and are true of their scene, with a breakdown and parse rate."""
    specs = [parse_caption(c) for c in captions]
    results = [
        None if spec is None else check(spec, scene) for spec, scene in zip(specs, scenes, strict=True)
    ]
    summary = _summarize("caption_accuracy", results)
    summary["parse_rate"] = sum(s is not None for s in specs) / max(len(specs), 1)
    return summary


# ---------------------------------------------------------------------------- edits


def _same(found: ShapeObject, wanted: ShapeObject, region: str | None) -> bool:
    """Same shape, color and size; and at its place (or, for a moved or added object, in its region)."""
    if (found.shape, found.color, found.size) != (wanted.shape, wanted.color, wanted.size):
        return False
    if region is not None:
        return in_region(found, region, CHECK_REGION_MARGIN)
    return math.hypot(found.x - wanted.x, found.y - wanted.y) <= EDIT_POSITION_TOLERANCE


def _all_found(wanted: list[tuple[ShapeObject, str | None]], found: tuple[ShapeObject, ...]) -> bool:
    """Whether each wanted object matches a different found one (scenes hold at most 3 objects)."""
    return any(
        all(_same(found[j], w, region) for j, (w, region) in zip(pick, wanted))
        for pick in itertools.permutations(range(len(found)), len(wanted))
    )


def edit_check(edit: EditTriple, scene: Scene) -> dict[str, bool]:
    """ "exact": `scene` (read from the edited image) is the target scene, object for object; "untouched":
    every object the edit should have left alone is still there, unchanged (other objects allowed)."""
    wanted = [(o, edit.region if i == edit.edited else None) for i, o in enumerate(edit.target.objects)]
    kept = [w for i, w in enumerate(wanted) if i != edit.edited]
    return {
        "exact": len(scene.objects) == len(wanted) and _all_found(wanted, scene.objects),
        "untouched": _all_found(kept, scene.objects),
    }


def edit_accuracy(edits: list[EditTriple], images: list[torch.Tensor]) -> dict[str, float]:
    """edit_accuracy: the share of edited images read as exactly their target scene, overall and per kind
    of edit; edit_untouched: of the edits that leave some object alone, the share whose untouched
    objects stayed as they were."""
    results = [edit_check(e, read_scene(im)) for e, im in zip(edits, images, strict=True)]
    kept = [r["untouched"] for r in results if r["untouched"] is not None]
    metrics = {
        "edit_accuracy": sum(r["exact"] for r in results) / max(len(results), 1),
        "edit_untouched": sum(kept) / len(kept) if kept else float("nan"),
    }
    for kind in EDIT_KINDS:
        of_kind = [r["exact"] for e, r in zip(edits, results) if e.kind == kind]
        metrics[f"edit_accuracy/{kind}"] = sum(of_kind) / len(of_kind) if of_kind else float("nan")
    metrics["n"] = len(results)
    return metrics
