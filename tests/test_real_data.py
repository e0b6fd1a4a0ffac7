"""Real image datasets: the IDX reader, Fashion-MNIST (on tiny files and on the Debian package's),
Noto Color Emoji rendering, epoch-by-epoch reading of finite datasets, and missing-file messages."""

import gzip
import struct
import unicodedata

import numpy as np
import pytest
import torch

from motfusion.cli import main
from motfusion.data.emoji import (
    EMOJI_FONT,
    EmojiDataset,
    emoji_codepoints,
    render_emoji,
    split_codepoints,
)
from motfusion.data.fashion import (
    CLASSES,
    FASHION_DIR,
    TEMPLATES,
    FashionDataset,
    caption_for,
    caption_names_class,
    classes_named,
    read_idx,
)
from motfusion.data.pipeline import EpochOrder, build_dataset, make_packer
from motfusion.recipes import get_recipe
from motfusion.tokenizer import ByteTokenizer

IDX_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, IDX_CODES[array.dtype.type], array.ndim]) + struct.pack(
        f">{array.ndim}i", *array.shape
    )
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def tiny_fashion(root, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0):
    """Fashion-MNIST-shaped IDX files of random pixels; returns the arrays written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % len(CLASSES)).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, gz, dtype):
    array = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    if dtype == np.uint8:
        array = array.astype(np.int64).clip(0).astype(np.uint8)
    write_idx(tmp_path / "x.idx", array, gz)
    back = read_idx(tmp_path / "x.idx")
    assert back.shape == array.shape and back.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(back, array)


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">i", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="holds 3 bytes"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_dataset_from_a_path(tmp_path, gz):
    arrays = tiny_fashion(tmp_path, gz=gz)
    cfg = get_recipe("debug").override([f"data.dataset=fashion:{tmp_path}", "data.image_size=28"])
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (12, 5)
    for i in range(len(train)):
        s = train.sample(i)
        assert s.label == arrays["train"][1][i]
        assert caption_names_class(s.caption, s.label)
        assert torch.equal(s.image[0], s.image[2])  # grayscale, repeated on 3 channels
        expected = torch.from_numpy(arrays["train"][0][i]).float() / 127.5 - 1  # no resize at 28 px
        torch.testing.assert_close(s.image[1], expected)
    again = FashionDataset(root=tmp_path, split="train", image_size=28)
    assert [again.sample(i).caption for i in range(12)] == [train.sample(i).caption for i in range(12)]
    with pytest.raises(IndexError):
        train.sample(12)


def test_fashion_resizes_to_the_image_size(tmp_path):
    tiny_fashion(tmp_path)
    s = FashionDataset(root=tmp_path, split="val", image_size=16).sample(0)
    assert s.image.shape == (3, 16, 16)
    assert s.image.min() >= -1 and s.image.max() <= 1


def test_captions_name_exactly_their_class():
    for label in range(len(CLASSES)):
        for t in range(len(TEMPLATES)):
            assert classes_named(caption_for(label, t)) == {label}, caption_for(label, t)
    assert classes_named("a photo of a t-shirt") == {0}  # not also "shirt"
    assert classes_named("a shirt next to a bag") == {6, 8}
    assert not caption_names_class("a shirt next to a bag", 6)
    assert classes_named("a red circle") == set()


def test_finite_dataset_is_read_epoch_by_epoch(tmp_path):
    tiny_fashion(tmp_path, n_train=12)
    dataset = FashionDataset(root=tmp_path, split="train", image_size=28)
    order = EpochOrder(dataset, seed=3)
    epochs = [[order(e * 12 + i) for i in range(12)] for e in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)  # each epoch sees every item once
    assert epochs[0] != epochs[1]  # in a new order
    fresh = EpochOrder(dataset, seed=3)
    assert [fresh(i) for i in reversed(range(36))] == [x for e in epochs for x in e][
        ::-1
    ]  # pure function of the index
    assert [EpochOrder(dataset, seed=4)(i) for i in range(12)] != epochs[0]


def test_packer_wraps_around_a_finite_dataset(tmp_path):
    tiny_fashion(tmp_path, n_train=12)
    cfg = get_recipe("debug").override([f"data.dataset=fashion:{tmp_path}", "train.batch_size=2"])
    packer = make_packer(cfg, ByteTokenizer())
    images = sum(packer.next_batch().images.shape[0] for _ in range(8))
    assert (
        packer.next_doc > 2 * 12 and images == packer.next_doc
    )  # well past two epochs, every document placed


def test_missing_fashion_files_name_the_fix(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*dataset-fashion-mnist"):
        FashionDataset(root=tmp_path / "nowhere", split="train")
    status = main(
        ["train", "--recipe", "debug", "--out", str(tmp_path / "run"), f"data.dataset=fashion:{tmp_path}"]
    )
    assert status == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_missing_font_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        EmojiDataset(font_path=tmp_path / "NoFont.ttf")


def test_fashion_package_files():
    """The Debian package's files: 60k train and 10k test images, 6000 and 1000 per class."""
    cfg = get_recipe("debug").override(["data.dataset=fashion"])
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert train.root == FASHION_DIR
    assert train.images.shape == (60000, 28, 28) and val.images.shape == (10000, 28, 28)
    assert (
        np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(val.labels).tolist() == [1000] * 10
    )


def test_emoji_codepoints_and_split():
    cps = emoji_codepoints(EMOJI_FONT)
    assert 0x1F600 in cps and 0x2764 in cps  # grinning face, heavy black heart
    assert not {0x30, 0x23, 0x200D, 0xFE0F, 0x20E3} & set(cps)  # digits, '#', joiner, selector, keycap
    train, val = split_codepoints(cps, "train"), split_codepoints(cps, "val")
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(cps)
    assert val == cps[9::10]


def test_emoji_render():
    for cp in (0x1F600, 0x1F408, 0x2764):  # grinning face, cat, heart
        image = render_emoji(cp, 32)
        assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1
        assert (image < 0.5).any(dim=0).float().mean() > 0.2  # drawn, not the white background
    grin, cat = render_emoji(0x1F600, 32), render_emoji(0x1F408, 32)
    assert (grin - cat).abs().mean() > 0.1
    assert torch.equal(render_emoji(0x1F600, 16), render_emoji(0x1F600, 16))


def test_emoji_dataset_samples():
    cfg = get_recipe("debug").override(["data.dataset=emoji", "data.image_size=16"])
    val = build_dataset(cfg, "val")
    assert len(val) == len(split_codepoints(emoji_codepoints(EMOJI_FONT), "val"))
    s = val.sample(0)
    assert s.image.shape == (3, 16, 16)
    assert s.caption == unicodedata.name(chr(s.codepoint)).lower()
    assert torch.equal(val.sample(0).image, EmojiDataset(split="val", image_size=16).sample(0).image)
