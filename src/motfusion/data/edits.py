"""Image editing in the shapes world (`data.dataset=shapes-edit`): (source, instruction, target) triples.

Transfusion (section 4.4) fine-tunes on editing examples laid out as one sequence:

    [BOI source EOI] instruction [BOI target EOI]

The source and the instruction are context (`Image(context=True)`: clean, no diffusion loss, its
patches still attend to each other both ways; `Text(context=True)`: no next-token loss); the target
is diffused and scored as usual. The instruction must not be learned: after an image, the model
would write instructions where it should caption. An edit changes
one object of a shapes scene, named by its color and shape (only objects whose kind is unique in the
scene are edited, so the name is never ambiguous):

    recolor  "make the red circle blue"
    move     "move the red square to the left"
    add      "add a small green triangle at the top"
    remove   "remove the yellow circle"
    resize   "make the blue circle large"

Every triple is a pure function of (seed, split, index), like the scenes themselves. The val split's
triples (`edit_prompts`) are the held-out set that `motfusion eval --suite edit` scores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from motfusion.config import DataConfig, ObjectiveConfig
from motfusion.data.documents import document_for
from motfusion.data.shapes import (
    CAPTION_REGION_MARGIN,
    COLORS,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesDataset,
    border_margin,
    box,
    diameter,
    in_region,
    object_gap,
    render,
)
from motfusion.sequence import Document, Image, Text

EDIT_DATASETS = ("shapes-edit",)  # the datasets whose documents teach editing
EDIT_KINDS = ("recolor", "move", "add", "remove", "resize")
EDIT_LAYOUTS = ("source-first", "instruction-first")
_PROBE = ShapeObject("circle", "red", "small", 0.5, 0.5)  # placement only reads a box's center
MOVE_REGIONS = ("left", "right", "top", "bottom")


@dataclass(frozen=True)
class EditTriple:
    source: Scene
    instruction: str
    target: Scene
    kind: str  # one of EDIT_KINDS
    edited: int | None  # index in target.objects of the changed or added object; None: removed
    region: str | None = None  # move and add: where the edited object must end up (not an exact spot)


# ---------------------------------------------------------------------------- geometry


def _free(d: int, others: list[ShapeObject], n: int) -> np.ndarray:
    """(y0, x0) -> whether a box of side d there is inside the margins and keeps the gap to every other
    box: a boolean (n - d + 1, n - d + 1) grid of top-left corners."""
    lo, gap = border_margin(n), object_gap(n)
    starts = np.arange(n - d + 1)
    inside = (starts >= lo) & (starts + d <= n - lo)
    free = inside[:, None] & inside[None, :]
    for o in others:
        bx, by, bd = box(o, n)
        clear_x = (starts + d + gap <= bx) | (starts >= bx + bd + gap)
        clear_y = (starts + d + gap <= by) | (starts >= by + bd + gap)
        free &= clear_y[:, None] | clear_x[None, :]
    return free


@functools.lru_cache(maxsize=256)
def _in_region(d: int, region: str, n: int) -> np.ndarray:
    """(y0, x0) -> whether a box of side d there is clearly inside `region` (the caption margin)."""
    corners = range(n - d + 1)
    return np.array(
        [
            [in_region(_at(_PROBE, x0, y0, d, n), region, CAPTION_REGION_MARGIN) for x0 in corners]
            for y0 in corners
        ]
    )


def _at(obj: ShapeObject, x0: int, y0: int, d: int, n: int) -> ShapeObject:
    return replace(obj, x=(x0 + d / 2) / n, y=(y0 + d / 2) / n)


def _place_in(
    obj: ShapeObject, region: str, others: list[ShapeObject], n: int, rng: np.random.Generator
) -> ShapeObject | None:
    """`obj` moved to a free spot, uniform among those clearly inside `region`; None if there is none."""
    d = diameter(obj.size, n)
    spots = np.flatnonzero(_free(d, others, n) & _in_region(d, region, n))  # row-major: y0, then x0
    if not spots.size:
        return None
    y0, x0 = divmod(int(spots[rng.integers(spots.size)]), n - d + 1)
    return _at(obj, x0, y0, d, n)


# ---------------------------------------------------------------------------- edits


def _name(obj: ShapeObject) -> str:
    return f"{obj.color} {obj.shape}"


def _with(scene: Scene, i: int, obj: ShapeObject | None) -> Scene:
    """`scene` with object i replaced by `obj` (removed if None)."""
    objects = list(scene.objects)
    if obj is None:
        del objects[i]
    else:
        objects[i] = obj
    return Scene(tuple(objects), scene.image_size)


def _recolor(scene: Scene, i: int, rng: np.random.Generator) -> EditTriple | None:
    obj = scene.objects[i]
    taken = {(o.shape, o.color) for o in scene.objects}
    colors = [c for c in COLORS if (obj.shape, c) not in taken]
    color = colors[int(rng.integers(len(colors)))]
    target = _with(scene, i, replace(obj, color=color))
    return EditTriple(scene, f"make the {_name(obj)} {color}", target, "recolor", i)


def _move(scene: Scene, i: int, rng: np.random.Generator) -> EditTriple | None:
    obj, n = scene.objects[i], scene.image_size
    others = [o for k, o in enumerate(scene.objects) if k != i]
    regions = [r for r in MOVE_REGIONS if not in_region(obj, r, 0.0)]
    for k in rng.permutation(len(regions)):
        moved = _place_in(obj, regions[k], others, n, rng)
        if moved is not None:
            return EditTriple(
                scene,
                f"move the {_name(obj)} to the {regions[k]}",
                _with(scene, i, moved),
                "move",
                i,
                regions[k],
            )
    return None


def _resize(scene: Scene, i: int, rng: np.random.Generator) -> EditTriple | None:
    obj, n = scene.objects[i], scene.image_size
    size = SIZES[1 - SIZES.index(obj.size)]
    d = diameter(size, n)
    x0, y0 = round(obj.x * n - d / 2), round(obj.y * n - d / 2)  # the same center
    free = _free(d, [o for k, o in enumerate(scene.objects) if k != i], n)
    if not (0 <= min(x0, y0) and max(x0, y0) <= n - d and free[y0, x0]):
        return None
    target = _with(scene, i, _at(replace(obj, size=size), x0, y0, d, n))
    return EditTriple(scene, f"make the {_name(obj)} {size}", target, "resize", i)


def _remove(scene: Scene, i: int, rng: np.random.Generator) -> EditTriple | None:
    if len(scene.objects) < 2:  # the target would be an empty picture
        return None
    return EditTriple(scene, f"remove the {_name(scene.objects[i])}", _with(scene, i, None), "remove", None)


def _add(scene: Scene, rng: np.random.Generator) -> EditTriple | None:
    if len(scene.objects) >= 3:
        return None
    taken = {(o.shape, o.color) for o in scene.objects}
    kinds = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in taken]
    shape, color = kinds[int(rng.integers(len(kinds)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    region = tuple(POSITION_PHRASES)[int(rng.integers(len(POSITION_PHRASES)))]
    new = _place_in(
        ShapeObject(shape, color, size, 0.5, 0.5), region, list(scene.objects), scene.image_size, rng
    )
    if new is None:
        return None
    target = Scene((*scene.objects, new), scene.image_size)
    instruction = f"add a {size} {color} {shape} {POSITION_PHRASES[region]}"
    return EditTriple(scene, instruction, target, "add", len(scene.objects), region)


def random_edit(scene: Scene, rng: np.random.Generator) -> EditTriple | None:
    """One edit of `scene`, its kind uniform among those that apply; None if none does."""
    kinds = [(o.shape, o.color) for o in scene.objects]
    unique = [i for i, k in enumerate(kinds) if kinds.count(k) == 1]
    for k in rng.permutation(len(EDIT_KINDS)):
        kind = EDIT_KINDS[k]
        if kind == "add":
            edit = _add(scene, rng)
        elif unique:
            i = unique[int(rng.integers(len(unique)))]
            edit = {"recolor": _recolor, "move": _move, "resize": _resize, "remove": _remove}[kind](
                scene, i, rng
            )
        else:
            edit = None
        if edit is not None:
            return edit
    return None


# ---------------------------------------------------------------------------- datasets


class ShapesEditDataset:
    """Editing documents, with ordinary shapes documents mixed in (`data.edit_share` are edits) so a
    fine-tuned model keeps its text-to-image and captioning.

    Edits keep their instruction: an edit without one, [source] [target], taught the model that a
    clean image at the start of a document is followed by BOI, and it then opened images where it
    should caption (caption_accuracy 0.41 -> 0.00). Sampling guides against the unconditional
    text-to-image prompt instead, which the ordinary documents' caption dropout trains."""

    def __init__(self, scenes: ShapesDataset, data_cfg: DataConfig, objective_cfg: ObjectiveConfig):
        self.scenes, self.data_cfg, self.objective_cfg = scenes, data_cfg, objective_cfg

    def triple(self, index: int, rng: np.random.Generator) -> EditTriple | None:
        return random_edit(self.scenes.draw(index)[0], rng)

    def document(self, index: int, rng: np.random.Generator) -> Document:
        edit = self.triple(index, rng) if rng.random() < self.data_cfg.edit_share else None
        if edit is None:
            return document_for(self.scenes.sample(index), rng, self.data_cfg, self.objective_cfg)
        return edit_document(edit, layout=self.data_cfg.edit_layout)


def edit_document(edit: EditTriple, layout: str = "source-first") -> Document:
    """The edit as a document in `layout` (EDIT_LAYOUTS)."""
    source = Image(render(edit.source), context=True)
    return edit_prompt(source, edit.instruction, layout) + [Image(render(edit.target))]


def edit_prompt(source: Image, instruction: str, layout: str) -> Document:
    """What precedes the edited image: "source-first" (Transfusion 4.4) is [BOI source EOI] instruction;
    "instruction-first" is instruction [BOI source EOI], so that each target patch sits a fixed
    distance after its source patch whatever the instruction's length."""
    if layout not in EDIT_LAYOUTS:
        raise ValueError(f"edit layout {layout!r}: choose one of {EDIT_LAYOUTS}")
    text = Text(instruction, context=True)
    return [source, text] if layout == "source-first" else [text, source]


def edit_prompts(n: int, seed: int = 0, image_size: int = 32) -> list[EditTriple]:
    """`n` held-out edits (val scenes), in a fixed order: what the edit suite scores."""
    scenes = ShapesDataset(image_size=image_size, seed=seed, split="val")
    out, index = [], 0
    while len(out) < n:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xED17, index]))
        edit = random_edit(scenes.draw(index)[0], rng)
        if edit is not None:
            out.append(edit)
        index += 1
    return out
