from dataclasses import replace

import pytest
import torch

from motfusion.data.pipeline import build_dataset
from motfusion.data.shapes import (
    CAPTION_REGION_MARGIN,
    FORMS,
    MAX_CAPTION_CHARS,
    POSITION_PHRASES,
    Mention,
    Relation,
    Scene,
    ShapeObject,
    ShapesDataset,
    box,
    caption_form,
    caption_text,
    diameter,
    eval_prompts,
    in_region,
    object_gap,
    render,
    single_object_prompts,
)
from motfusion.errors import ConfigError
from motfusion.evaluation.shapes_eval import (
    caption_accuracy,
    check,
    geneval,
    parse_caption,
    read_scene,
)
from motfusion.recipes import get_recipe


def same_objects(read: Scene, true: Scene) -> bool:
    """Same shapes, colors and sizes, and centers within one pixel."""
    if len(read.objects) != len(true.objects):
        return False
    tol = 1 / true.image_size
    pairs = zip(sorted(read.objects, key=raster_order), sorted(true.objects, key=raster_order))
    return all(
        (a.shape, a.color, a.size) == (b.shape, b.color, b.size)
        and abs(a.x - b.x) <= tol
        and abs(a.y - b.y) <= tol
        for a, b in pairs
    )


def raster_order(obj: ShapeObject) -> tuple[float, float]:
    return obj.y, obj.x


def test_deterministic_by_seed_and_index():
    a, b = ShapesDataset(seed=3).sample(17), ShapesDataset(seed=3).sample(17)
    assert a.caption == b.caption and a.scene == b.scene and torch.equal(a.image, b.image)
    other = [ShapesDataset(seed=4).sample(i).scene for i in range(10)]
    assert other != [ShapesDataset(seed=3).sample(i).scene for i in range(10)]


def test_splits_differ():
    train, val = ShapesDataset(split="train"), ShapesDataset(split="val")
    same = sum(train.sample(i).scene == val.sample(i).scene for i in range(50))
    assert same <= 2


def test_object_count_distribution():
    ds = ShapesDataset(single_object_prob=0.6, max_objects=3)
    assert ds.object_count_probs == pytest.approx((0.6, 0.2, 0.2))
    assert all(len(ShapesDataset(max_objects=1).sample(i).scene.objects) == 1 for i in range(20))


@pytest.mark.parametrize("size", [16, 32, 48, 64])
def test_images_in_range_and_objects_apart(size):
    ds = ShapesDataset(image_size=size)
    for i in range(50):
        sample = ds.sample(i)
        assert sample.image.shape == (3, size, size) and sample.image.dtype == torch.float32
        assert sample.image.min() >= -1 and sample.image.max() <= 1
        boxes = []
        for obj in sample.scene.objects:
            r = diameter(obj.size, size) / 2 / size
            assert 0 < obj.x - r and obj.x + r < 1 and 0 < obj.y - r and obj.y + r < 1
            boxes.append((obj.x - r, obj.y - r, obj.x + r, obj.y + r))
        for k, a in enumerate(boxes):
            for b in boxes[:k]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def pixel_gap(a: ShapeObject, b: ShapeObject, size: int) -> int:
    """Free pixels between two objects' boxes along the axis where they are apart."""
    (ax0, ay0, ad), (bx0, by0, bd) = box(a, size), box(b, size)
    ax1, ay1, bx1, by1 = ax0 + ad, ay0 + ad, bx0 + bd, by0 + bd
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


@pytest.mark.parametrize("gap", [None, 0, 4, 6])
def test_objects_keep_the_gap_asked(gap):
    """data.object_gap: two objects' boxes are at least `gap` pixels apart (None: the default), and
    some pair sits at exactly that distance, so the gap is the one asked, not a larger one."""
    ds = ShapesDataset(image_size=32, single_object_prob=0.0, gap=gap)
    want = object_gap(32) if gap is None else gap
    gaps = []
    for i in range(300):
        objs = ds.draw(i)[0].objects
        gaps += [pixel_gap(a, b, 32) for k, a in enumerate(objs) for b in objs[:k]]
    assert min(gaps) == want


def test_data_object_gap_reaches_the_dataset():
    cfg = get_recipe("debug")
    assert build_dataset(cfg, "train").gap is None  # 0: the dataset's default
    assert build_dataset(cfg.override(["data.object_gap=5"]), "train").gap == 5
    with pytest.raises(ConfigError, match="data.object_gap"):
        cfg.override(["data.object_gap=-1"])


def test_captions_parse_and_are_true():
    ds = ShapesDataset()
    forms = set()
    for i in range(500):
        scene, parts = ds.draw(i)
        caption = ds.sample(i).caption
        assert caption == caption_text(parts)
        assert len(caption) <= MAX_CAPTION_CHARS and caption.isascii() and caption == caption.lower()
        spec = parse_caption(caption)
        assert spec is not None and spec.parts == parts, caption
        assert all(check(spec, scene).values()), caption
        forms.add(caption_form(parts))
    assert forms == set(FORMS)


def test_caption_size_and_position_probs_set_what_a_caption_states():
    """Both 1: every single object's caption states its size, and its position whenever it is in a
    clear region; 0: never. Scenes do not depend on them, and the captions stay true."""
    full, bare = (ShapesDataset(single_object_prob=1.0, size_prob=p, position_prob=p) for p in (1.0, 0.0))
    clear = 0
    for i in range(200):
        (scene, parts), (bare_scene, bare_parts) = full.draw(i), bare.draw(i)
        assert scene == bare_scene and all(check(parse_caption(caption_text(parts)), scene).values())
        regions = [r for r in POSITION_PHRASES if in_region(scene.objects[0], r, CAPTION_REGION_MARGIN)]
        (mention,), (bare_mention,) = parts, bare_parts
        assert mention.size == scene.objects[0].size and (mention.position is not None) == bool(regions)
        assert bare_mention.size is None and bare_mention.position is None
        clear += bool(regions)
    assert 50 < clear < 200  # both kinds of scene were seen


def test_example_captions():
    spec = parse_caption("a green triangle above a yellow circle")
    assert spec.parts == (Relation(Mention("triangle", "green"), "above", Mention("circle", "yellow")),)
    top = ShapeObject("triangle", "green", "small", 0.5, 0.2)
    bottom = ShapeObject("circle", "yellow", "large", 0.5, 0.8)
    assert check(spec, Scene((top, bottom), 32)) == {
        "shape": True,
        "color": True,
        "position": True,
        "objects": True,
    }
    top, bottom = replace(top, y=0.8), replace(bottom, y=0.2)
    assert check(spec, Scene((top, bottom), 32))["position"] is False
    two = parse_caption("two purple squares")
    squares = [ShapeObject("square", "purple", "small", x, 0.5) for x in (0.2, 0.5, 0.8)]
    assert check(two, Scene(tuple(squares[:2]), 32))["count"]
    assert not check(two, Scene(tuple(squares), 32))["count"]
    loose = parse_caption("A small blue square on the left.")
    assert loose.parts == (Mention("square", "blue", 1, "small", "left"),)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "a red",
        "a red circle and",
        "two red circle",
        "a red circles",
        "a blue hexagon",
        "red circle a",
        "a red circle above",
        "two red circles above a blue square",
        "a red circle somewhere",
    ],
)
def test_gibberish_does_not_parse(text):
    assert parse_caption(text) is None


def test_checker_reads_rendered_scenes():
    ds = ShapesDataset(split="val")
    samples = [ds.sample(i) for i in range(1000)]
    accuracy = sum(same_objects(read_scene(s.image), s.scene) for s in samples) / len(samples)
    print(f"checker accuracy at 32px: {accuracy:.4f}")
    assert accuracy >= 0.99
    assert all(read_scene(render(s.scene)) == read_scene(s.image) for s in samples[:20])


@pytest.mark.parametrize("size", [16, 64])
def test_checker_other_sizes(size):
    ds = ShapesDataset(image_size=size, split="val")
    samples = [ds.sample(i) for i in range(200)]
    accuracy = sum(same_objects(read_scene(s.image), s.scene) for s in samples) / len(samples)
    print(f"checker accuracy at {size}px: {accuracy:.4f}")
    assert accuracy >= 0.99


def test_checker_robust_to_noise():
    g = torch.Generator().manual_seed(0)
    ds = ShapesDataset(split="val")
    samples = [ds.sample(i) for i in range(300)]
    noisy = [s.image + 0.1 * torch.randn(s.image.shape, generator=g) for s in samples]
    accuracy = sum(same_objects(read_scene(x), s.scene) for x, s in zip(noisy, samples)) / len(samples)
    print(f"checker accuracy at 32px with noise std 0.1: {accuracy:.4f}")
    assert accuracy >= 0.99


def test_geneval_true_and_shuffled():
    prompts = eval_prompts(300, seed=1)
    captions = [c for c, _ in prompts]
    images = [render(scene) for _, scene in prompts]
    result = geneval(captions, images)
    assert result["n"] == 300
    assert all(v == 1.0 for k, v in result.items() if k.startswith("geneval")), result
    mismatched = geneval(captions, images[1:] + images[:1])
    print(f"geneval with mismatched images: {mismatched}")
    assert mismatched["geneval"] < 0.2


def test_single_object_prompts():
    prompts = single_object_prompts(50, seed=2)
    assert len(prompts) == 50 and all(len(scene.objects) == 1 for _, scene in prompts)
    assert geneval([c for c, _ in prompts], [render(s) for _, s in prompts])["geneval"] == 1.0


def test_caption_accuracy():
    ds = ShapesDataset(split="val")
    samples = [ds.sample(i) for i in range(300)]
    captions, scenes = [s.caption for s in samples], [s.scene for s in samples]
    result = caption_accuracy(captions, scenes)
    assert result["caption_accuracy"] == 1.0 and result["parse_rate"] == 1.0
    shuffled = caption_accuracy(captions[1:] + captions[:1], scenes)
    print(f"caption accuracy with mismatched captions: {shuffled}")
    assert shuffled["caption_accuracy"] < 0.3
    broken = caption_accuracy(["gibberish"] + captions[1:], scenes)
    assert broken["parse_rate"] == pytest.approx(299 / 300)
    assert broken["caption_accuracy"] == pytest.approx(299 / 300)


def test_extra_objects_fail_the_objects_clause():
    """A prompt is not satisfied by an image that also holds objects the prompt does not mention
    (e.g. patch noise that happens to contain a red fragment)."""
    from motfusion.data.shapes import Scene, ShapeObject, render

    red = ShapeObject(shape="square", color="red", size="large", x=0.3, y=0.3)
    blue = ShapeObject(shape="circle", color="blue", size="small", x=0.75, y=0.75)
    alone, crowded = (
        render(Scene(objects=(red,), image_size=32)),
        render(Scene(objects=(red, blue), image_size=32)),
    )
    assert geneval(["a red square"], [alone])["geneval"] == 1.0
    scores = geneval(["a red square"], [crowded])
    assert scores["geneval"] == 0.0 and scores["geneval/color"] == 1.0 and scores["geneval/objects"] == 0.0


def test_eval_prompts_parse_back_to_their_form():
    """The per-form geneval breakdown reads each prompt's form from its parse: it must be the form it was drawn for."""
    prompts = eval_prompts(60, seed=1)
    forms = [caption_form(parse_caption(p).parts) for p, _ in prompts]
    assert forms == [f for f in FORMS for _ in range(10)]
