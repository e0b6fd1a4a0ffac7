"""User datasets: manifest and folder train end to end; every kind of bad input is named by file and
line (or skipped and counted); splits and index -> sample are deterministic; pixels are well formed."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from motfusion.cli import main
from motfusion.data import user
from motfusion.data.pipeline import DocumentStream, build_dataset
from motfusion.data.scan import ImageRules, load_pixels
from motfusion.errors import DataError
from motfusion.recipes import get_recipe
from motfusion.sequence import Image, Text
from motfusion.tokenizer import ByteTokenizer
from motfusion.training.logging import read_metrics

FAST = [
    "train.batch_size=2",
    "train.seq_len=128",
    "train.log_every=1",
    "train.device=cpu",
    "data.val_fraction=0",
]


def write_bytes(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_png(path, w=20, h=20, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    PILImage.fromarray(pixels).save(path)
    return path


def good_lines(n=4):
    """Interleaved documents: caption-image, image-caption, text around an image, text only."""
    layouts = [
        lambda i: [{"text": f"a picture {i}"}, {"image": f"img/{i}.png"}],
        lambda i: [{"image": f"img/{i}.png"}, {"text": f"picture {i}"}],
        lambda i: [{"text": "before"}, {"image": f"img/{i}.png"}, {"text": f"after {i}"}],
        lambda i: [{"text": f"just text {i}"}],
    ]
    return [json.dumps({"segments": layouts[i % 4](i)}) for i in range(n)]


def write_manifest(root, extra=(), n=4):
    """n good documents (lines 1..n) then `extra` lines (str or bytes), as root/m.jsonl."""
    for i in range(n):
        write_png(root / "img" / f"{i}.png", seed=i)
    lines = [line.encode() if isinstance(line, str) else line for line in [*good_lines(n), *extra]]
    (root / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root / "m.jsonl"


def write_folder(root, n=4):
    for i in range(n):
        write_png(root / f"{i:02d}.png", w=24, h=20, seed=i)
        (root / f"{i:02d}.txt").write_text(f"caption {i}\n")
    return root


def cfg_for(dataset, *overrides):
    return get_recipe("debug").override([*FAST, f"data.dataset={dataset}", *overrides])


def train_cli(tmp_path, dataset, *overrides, steps=2):
    return main(
        [
            "train",
            "--recipe",
            "debug",
            "--out",
            str(tmp_path / "run"),
            "--steps",
            str(steps),
            *FAST,
            f"data.dataset={dataset}",
            *overrides,
        ]
    )


# ---- valid data trains ----------------------------------------------------------------------------


def test_manifest_trains_end_to_end(tmp_path):
    manifest = write_manifest(tmp_path / "data")
    assert train_cli(tmp_path, f"manifest:{manifest}") == 0
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2]
    assert all(r["tokens/image"] > 0 and r["tokens/text"] > 0 for r in metrics)


def test_folder_trains_end_to_end(tmp_path):
    folder = write_folder(tmp_path / "pics")
    assert train_cli(tmp_path, f"folder:{folder}") == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


# ---- bad data: one clear line naming file and line -------------------------------------------------


def _truncated_png(root):
    data = write_png(root / "img" / "cut.png", seed=9).read_bytes()
    (root / "img" / "cut.png").write_bytes(data[: len(data) // 2])


def _image_doc(name):
    return json.dumps({"segments": [{"text": "x"}, {"image": name}]})


# name -> (setup(root) before writing the manifest, the bad 5th line, extra overrides, expected phrases)
BAD_MANIFEST_LINES = {
    "corrupt png": (
        lambda r: write_bytes(r / "img" / "bad.png", b"\x89PNG junk" * 9),
        _image_doc("img/bad.png"),
        [],
        ["img/bad.png", "not an image"],
    ),
    "truncated png": (_truncated_png, _image_doc("img/cut.png"), [], ["img/cut.png", "truncated or corrupt"]),
    "missing file": (None, _image_doc("img/nope.png"), [], ["img/nope.png", "does not exist"]),
    "directory as image": (
        lambda r: (r / "img" / "dir.png").mkdir(parents=True),
        _image_doc("img/dir.png"),
        [],
        ["img/dir.png", "is a directory, not a regular file"],
    ),
    "invalid json": (None, '{"segments": [{"text": "x"}', [], ["invalid JSON"]),
    "not a document": (None, "[1, 2]", [], ['{"segments"']),
    "unknown segment type": (
        None,
        json.dumps({"segments": [{"video": "a.mp4"}]}),
        [],
        ["unknown segment type 'video'"],
    ),
    "empty document": (None, '{"segments": []}', [], ["empty document"]),
    "blank text only": (None, '{"segments": [{"text": ""}]}', [], ["empty document"]),
    "non-utf8 line": (
        None,
        b'{"segments": [{"text": "caf\xe9"}]}',
        [],
        ["byte 0xe9 at column 28 is not UTF-8"],
    ),
    "lone surrogate": (None, '{"segments": [{"text": "a\\udc80"}]}', [], ["not valid Unicode"]),
    "too small image": (
        lambda r: write_png(r / "img" / "tiny.png", 4, 4),
        _image_doc("img/tiny.png"),
        [],
        ["img/tiny.png", "4x4", "below 16 pixels (data.min_image_size"],
    ),
    "too large image": (
        lambda r: write_png(r / "img" / "big.png", 40, 40),
        _image_doc("img/big.png"),
        ["data.max_image_pixels=1000"],
        ["img/big.png", "1600 pixels", "data.max_image_pixels=1000"],
    ),
    "longer than seq_len": (
        None,
        json.dumps({"segments": [{"text": "x" * 300}]}),
        [],
        ["302 positions", "train.seq_len=128"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_MANIFEST_LINES))
def test_bad_manifest_line_is_one_clear_error(case, tmp_path, capsys):
    setup, line, overrides, phrases = BAD_MANIFEST_LINES[case]
    root = tmp_path / "data"
    if setup is not None:
        setup(root)
    manifest = write_manifest(root, [line])
    assert train_cli(tmp_path, f"manifest:{manifest}", *overrides) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"motfusion: error: {manifest}:5: ") and err.count("\n") == 1
    assert "Traceback" not in err and "data.on_bad_sample=skip" in err
    for phrase in phrases:
        assert phrase in err


@pytest.mark.parametrize(
    "modalities, phrase",
    [
        ({"text": 0, "image": 1}, "speech is not available yet (no speech modality is registered)"),
        ({"text": 0, "image": 1, "speech": 2}, "speech is not available in manifests yet"),
    ],
)
def test_audio_segments_say_why_speech_is_unavailable(tmp_path, monkeypatch, modalities, phrase):
    monkeypatch.setattr(user, "MODALITIES", modalities)
    manifest = write_manifest(tmp_path / "data", [json.dumps({"segments": [{"audio": "a.wav"}]})])
    with pytest.raises(DataError) as error:
        build_dataset(cfg_for(f"manifest:{manifest}"), "train")
    assert f"m.jsonl:5: segment 1 is 'audio', but {phrase}" in str(error.value)


def test_bad_folder_samples_name_the_file(tmp_path, capsys):
    folder = write_folder(tmp_path / "pics")
    (folder / "01.txt").write_bytes(b"fine first line\ncaf\xe9\n")
    (folder / "02.txt").unlink()
    (folder / "03.png").write_bytes(b"not a png at all")
    assert train_cli(tmp_path, f"folder:{folder}") == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"motfusion: error: {folder / '01.txt'}: byte 0xe9 at line 2, column 4 is not UTF-8"
    )
    assert "2 more bad sample(s): 1 missing caption, 1 corrupt image" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "dataset, phrase",
    [
        ("manifest:{root}/none.jsonl", "is not an existing file"),
        ("folder:{root}/none", "is not an existing folder"),
        ("folder:{root}", "no images found"),
        ("manifest", "needs a path"),
    ],
)
def test_missing_dataset_paths_are_one_clear_error(tmp_path, capsys, dataset, phrase):
    assert train_cli(tmp_path, dataset.format(root=tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("motfusion: error: ") and phrase in err and "Traceback" not in err


# ---- skipping ----------------------------------------------------------------------------------------


def test_skip_trains_on_the_rest_and_counts_by_reason(tmp_path, caplog):
    root = tmp_path / "data"
    write_bytes(root / "img" / "bad.png", b"junk")
    bad = [
        _image_doc("img/bad.png"),
        "{oops",
        _image_doc("img/gone.png"),
        _image_doc("img/gone2.png"),
        '{"segments": []}',
    ]
    manifest = write_manifest(root, bad)
    with caplog.at_level(logging.WARNING, logger="motfusion.data"):
        assert train_cli(tmp_path, f"manifest:{manifest}", "data.on_bad_sample=skip") == 0
    assert [r.getMessage() for r in caplog.records if r.name == "motfusion.data"] == [
        f"data: manifest {manifest}: skipped 5 of 9 samples (2 missing file, 1 corrupt image, 1 invalid JSON, "
        f"1 empty document); first: {manifest}:5: {root / 'img' / 'bad.png'}: not an image Pillow can read "
        "(corrupt, or an unsupported format)"
    ]
    dataset = build_dataset(cfg_for(f"manifest:{manifest}", "data.on_bad_sample=skip"), "train")
    assert len(dataset) == 4 and dataset.report.kept == 4
    assert dataset.report.counts() == {
        "missing file": 2,
        "corrupt image": 1,
        "invalid JSON": 1,
        "empty document": 1,
    }


def test_skip_with_nothing_left_is_an_error(tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    (root / "m.jsonl").write_text("{oops\n" + _image_doc("gone.png") + "\n")
    assert train_cli(tmp_path, f"manifest:{root / 'm.jsonl'}", "data.on_bad_sample=skip") == 2
    err = capsys.readouterr().err
    assert (
        "no usable samples: all 2 are bad (1 invalid JSON, 1 missing file)" in err and "Traceback" not in err
    )


def test_image_changed_after_the_scan_is_a_data_error(tmp_path):
    manifest = write_manifest(tmp_path / "data")
    dataset = build_dataset(cfg_for(f"manifest:{manifest}"), "train")
    (tmp_path / "data" / "img" / "0.png").write_bytes(b"broken later")
    with pytest.raises(DataError, match="0.png: not an image .* did the file change"):
        dataset.document(0, np.random.default_rng(0))


# ---- splits, determinism, pixels ----------------------------------------------------------------------


def test_val_split_is_a_stable_hash_of_each_line(tmp_path):
    manifest = write_manifest(tmp_path / "a", n=40)
    lines = manifest.read_text().splitlines()
    shuffled = tmp_path / "a" / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines[::-1]) + "\n")
    splits = {}
    for path in (manifest, shuffled):
        cfg = cfg_for(f"manifest:{path}", "data.val_fraction=0.3")
        splits[path] = train, val = [set(build_dataset(cfg, s).docs) for s in ("train", "val")]
        assert train and val and not train & val
        assert train | val == set(
            build_dataset(cfg_for(f"manifest:{path}"), "train").docs
        )  # val_fraction=0: all
    assert splits[manifest] == splits[shuffled]


def test_empty_split_is_an_error(tmp_path):
    cfg = cfg_for(f"manifest:{write_manifest(tmp_path / 'data')}", "data.val_fraction=0.999999")
    with pytest.raises(DataError, match="the train split is empty"):
        build_dataset(cfg, "train")


def _doc_key(doc):
    return tuple(s.text if isinstance(s, Text) else s.pixels.numpy().tobytes() for s in doc)


@pytest.mark.parametrize("kind", ["manifest", "folder"])
def test_documents_are_deterministic_and_images_well_formed(tmp_path, kind):
    path = write_manifest(tmp_path / "data") if kind == "manifest" else write_folder(tmp_path / "pics")
    cfg, tok = cfg_for(f"{kind}:{path}"), ByteTokenizer()
    a, b = (DocumentStream(build_dataset(cfg, "train"), tok, cfg, "train") for _ in range(2))
    indices = [5, 0, 9, 5, 2]  # across epochs, out of order, repeated
    docs = [a.document(i) for i in indices]
    assert [_doc_key(d) for d in docs] == [_doc_key(b.document(i)) for i in indices]
    images = [s.pixels for d in docs for s in d if isinstance(s, Image)]
    assert images and all(x.shape == (3, 16, 16) and x.dtype == torch.float32 for x in images)
    assert all(x.min() >= -1 and x.max() <= 1 for x in images) and min(x.min() for x in images) < -0.9


def test_manifest_caption_dropout_only_drops_the_opening_text(tmp_path):
    cfg = cfg_for(f"manifest:{write_manifest(tmp_path / 'data', n=3)}", "objective.cfg_dropout=0.5")
    dataset = build_dataset(cfg, "train")
    layouts = {i: [] for i in range(3)}
    for seed in range(200):
        for i in range(3):
            layouts[i].append(tuple(type(s) for s in dataset.document(i, np.random.default_rng(seed))))
    assert set(layouts[0]) == {(Text, Image), (Image,)}  # caption, image: the caption may go
    assert 0.35 < layouts[0].count((Image,)) / 200 < 0.65
    assert set(layouts[1]) == {(Image, Text)}  # image first: kept as written
    assert set(layouts[2]) == {(Text, Image, Text), (Image, Text)}


@pytest.mark.parametrize("scale", [1, 4])
def test_images_are_center_cropped_then_resized(tmp_path, scale):
    """Three equal stripes, red | blue | green, along the long side: only blue survives the crop."""
    s = 16 * scale
    stripes = np.zeros((s, 3 * s, 3), np.uint8)
    stripes[:, :s, 0] = stripes[:, s : 2 * s, 2] = stripes[:, 2 * s :, 1] = 255
    PILImage.fromarray(stripes).save(tmp_path / "wide.png")
    PILImage.fromarray(np.ascontiguousarray(stripes.transpose(1, 0, 2))).save(tmp_path / "tall.png")
    blue = torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 16, 16)
    rules = ImageRules(size=16, min_side=16, max_pixels=10**6)
    for name in ("wide.png", "tall.png"):
        x = load_pixels(tmp_path / name, rules)  # (3, 16, 16)
        assert x.shape == (3, 16, 16)
        assert torch.allclose(
            x[:, 1:-1, 1:-1], blue[:, 1:-1, 1:-1], atol=0.02
        )  # a resize may blend the border
