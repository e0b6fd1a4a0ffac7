"""The shapes evaluation suites: generate from held-out prompts, images and edits, and score with the checker."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from motfusion.data.edits import EditTriple, edit_prompts
from motfusion.data.shapes import (
    FORMS,
    ShapesDataset,
    caption_form,
    eval_prompts,
    render,
    single_object_prompts,
)
from motfusion.evaluation.shapes_eval import (
    caption_accuracy,
    check,
    edit_accuracy,
    edit_check,
    geneval,
    parse_caption,
    read_scene,
)
from motfusion.sampling import Generator
from motfusion.sampling.batches import captions_in_batches, edits_in_batches, images_in_batches


@dataclass
class ShapesEval:
    metrics: dict[str, float]
    prompts: list[str] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # one per prompt
    prompt_ok: list[bool] = field(default_factory=list)
    caption_images: list[torch.Tensor] = field(default_factory=list)
    truths: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_ok: list[bool] = field(default_factory=list)


def evaluate_shapes(
    gen: Generator,
    *,
    n_single: int = 48,
    n_prompts: int = 60,
    n_captions: int = 64,
    seed: int = 0,
    batch_size: int = 32,
) -> ShapesEval:
    """geneval on single-object prompts and on every caption form; caption_accuracy on held-out images."""
    size = gen.image_size
    g = torch.Generator(device=gen.device).manual_seed(seed)
    single = [p for p, _ in single_object_prompts(n_single, seed=seed, image_size=size)]
    mixed = [p for p, _ in eval_prompts(n_prompts, seed=seed + 1, image_size=size)]
    prompts = single + mixed
    images = list(images_in_batches(gen, prompts, g, batch_size))
    single_scores = geneval(single, images[:n_single])
    mixed_scores = geneval(mixed, images[n_single:])
    prompt_ok = [all(check(parse_caption(p), read_scene(im)).values()) for p, im in zip(prompts, images)]
    forms = [caption_form(parse_caption(p).parts) for p in mixed]
    per_form = {
        f"geneval_form/{form}": sum(ok for ok, f in zip(prompt_ok[n_single:], forms) if f == form)
        / forms.count(form)
        for form in FORMS
        if form in forms
    }

    val = ShapesDataset(image_size=size, seed=seed, split="val")
    samples = [val.sample(i) for i in range(n_captions)]
    cap_images = torch.stack([s.image for s in samples])
    captions = captions_in_batches(gen, cap_images, g, batch_size)
    scenes = [s.scene for s in samples]
    cap_scores = caption_accuracy(captions, scenes)
    caption_ok = [caption_accuracy([c], [s])["caption_accuracy"] == 1.0 for c, s in zip(captions, scenes)]
    single_idx = [i for i, s in enumerate(scenes) if len(s.objects) == 1]
    single_caps = caption_accuracy([captions[i] for i in single_idx], [scenes[i] for i in single_idx])

    metrics = {
        "geneval_single": single_scores["geneval"],
        **{f"geneval_single/{k.split('/')[1]}": v for k, v in single_scores.items() if "/" in k},
        "geneval": mixed_scores["geneval"],
        **{k: v for k, v in mixed_scores.items() if "/" in k},
        **per_form,
        "caption_accuracy": cap_scores["caption_accuracy"],
        **{k: v for k, v in cap_scores.items() if "/" in k or k == "parse_rate"},
        "caption_accuracy_single": single_caps["caption_accuracy"],
    }
    return ShapesEval(
        metrics,
        prompts,
        images,
        prompt_ok,
        list(cap_images),
        [s.caption for s in samples],
        captions,
        caption_ok,
    )


@dataclass
class EditEval:
    metrics: dict[str, float]
    edits: list[EditTriple] = field(default_factory=list)
    sources: list[torch.Tensor] = field(default_factory=list)  # pixels (3, H, W), one per edit
    outputs: list[torch.Tensor] = field(default_factory=list)
    ok: list[bool] = field(default_factory=list)  # read as exactly the target scene


def evaluate_edits(
    gen: Generator, *, n: int = 64, seed: int = 0, batch_size: int = 32, layout: str = "source-first"
) -> EditEval:
    """edit_accuracy on `n` held-out edits (data/edits.py edit_prompts), and the share whose untouched
    objects stayed as they were; `layout`: the model's data.edit_layout."""
    g = torch.Generator(device=gen.device).manual_seed(seed)
    edits = edit_prompts(n, seed=seed, image_size=gen.image_size)
    sources = torch.stack([render(e.source) for e in edits])
    outputs = list(edits_in_batches(gen, sources, [e.instruction for e in edits], g, batch_size, layout))
    ok = [edit_check(e, read_scene(im))["exact"] for e, im in zip(edits, outputs)]
    return EditEval(edit_accuracy(edits, outputs), edits, list(sources), outputs, ok)
