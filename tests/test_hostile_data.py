"""Hostile data: pixel formats Pillow hands back, truncated pictures, pathological manifest lines,
paths that are not regular files, and the smaller CLI mistakes around data.

As in test_hostile_runs.py, every failure must be one line naming the file (and line), exit 2, no
traceback; and with data.on_bad_sample=skip, the bad sample is counted, never silently dropped.
"""

import json
import logging
import os
import signal
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line, cli
from PIL import Image as PILImage
from PIL import ImageFile
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from motfusion.cli import main
from motfusion.data.scan import BadSample, ImageRules, check_images, open_image, to_pixels
from motfusion.training.checkpoint import list_checkpoints

FAST = ["train.tensorboard=false", "train.log_every=1", "data.val_fraction=0"]
RULES = ImageRules(size=16, min_side=16, max_pixels=10_000_000)


@pytest.fixture
def no_hang():
    """Fail, rather than hang, a test whose code opens something that blocks (a FIFO)."""

    def alarm(*_):
        raise TimeoutError("blocked: something opened a FIFO")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def png(
    path: Path, w: int, h: int, rows: bytes, *, depth: int = 8, colour: int = 2, interlace: int = 0
) -> Path:
    """A PNG from raw scanlines (each led by its filter byte), to make files Pillow will not write."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def rgb_rows(w: int, h: int) -> bytes:
    return b"".join(b"\x00" + bytes(range(r, r + 3 * w)) for r in range(h))


def adam7_rows(w: int, h: int) -> bytes:
    """The scanlines of an interlaced (Adam7) 8-bit RGB image: seven passes of sub-images."""
    passes = (
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    )
    out = b""
    for x, y, dx, dy in passes:
        cols, rows = -(-(w - x) // dx), -(-(h - y) // dy)
        if w > x and h > y:
            out += (b"\x00" + bytes(3 * cols)) * rows
    return out


def ramp16(path: Path, size: int = 32) -> Path:
    values = np.linspace(0, 65535, size * size).reshape(size, size).astype(np.uint16)
    PILImage.fromarray(values).save(path)
    return path


def good_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", (32, 32), (200, 40, 40)).save(path)
    return path


# ---- 3. pixel formats and truncated pixel data --------------------------------------------------


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    pic = open_image(ramp16(tmp_path / "ramp.png"), RULES)
    assert pic.mode.startswith("I")
    pixels = to_pixels(pic, 16)  # (3, 16, 16) in [-1, 1]
    assert abs(pixels.mean().item()) < 0.05  # a 0..65535 ramp is mid-grey on average, not white
    assert pixels.min() < -0.9 and pixels.max() > 0.9


def test_16_bit_data_in_a_32_bit_integer_image_is_scaled(tmp_path):
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.int32)
    PILImage.fromarray(values, "I").save(tmp_path / "i.tiff")
    assert abs(to_pixels(open_image(tmp_path / "i.tiff", RULES), 16).mean().item()) < 0.05


def test_32_bit_integers_beyond_16_bits_are_refused_with_a_reason(tmp_path):
    values = np.linspace(0, 2**31 - 1, 32 * 32).reshape(32, 32).astype(np.int32)
    PILImage.fromarray(values, "I").save(tmp_path / "i.tiff")
    with pytest.raises(BadSample) as info:
        open_image(tmp_path / "i.tiff", RULES)
    assert info.value.reason == "unsupported pixels" and "no known scale" in info.value.detail


def test_float_image_in_0_1_is_scaled(tmp_path):
    PILImage.fromarray(np.linspace(0, 1, 32 * 32).reshape(32, 32).astype(np.float32), "F").save(
        tmp_path / "f.tiff"
    )
    pixels = to_pixels(open_image(tmp_path / "f.tiff", RULES), 16)
    assert abs(pixels.mean().item()) < 0.05 and pixels.min() < -0.9 and pixels.max() > 0.9


@pytest.mark.parametrize(
    "values", [np.linspace(0, 255, 32 * 32), np.full(32 * 32, np.nan)], ids=["0-255", "nan"]
)
def test_float_image_outside_0_1_is_refused_with_a_reason(tmp_path, values):
    PILImage.fromarray(values.reshape(32, 32).astype(np.float32), "F").save(tmp_path / "f.tiff")
    with pytest.raises(BadSample) as info:
        open_image(tmp_path / "f.tiff", RULES)
    assert "[0, 1]" in info.value.detail


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "RGB", "RGBA", "I;16"])
def test_every_png_mode_pillow_writes_passes_the_scan(tmp_path, mode):
    pic = PILImage.linear_gradient("L").resize((32, 32))
    pic = pic.convert(mode) if mode != "I;16" else PILImage.fromarray(np.asarray(pic).astype(np.uint16) * 257)
    pic.save(tmp_path / "x.png")
    assert to_pixels(open_image(tmp_path / "x.png", RULES), 16).shape == (3, 16, 16)


def test_png_whose_pixel_data_ends_early_is_caught(tmp_path):
    short = png(tmp_path / "short.png", 32, 32, rgb_rows(32, 32)[: 16 * (1 + 96)])  # half the rows
    with pytest.raises(BadSample) as info:
        open_image(short, RULES)
    assert info.value.reason == "corrupt image" and "ends early" in info.value.detail
    open_image(png(tmp_path / "whole.png", 32, 32, rgb_rows(32, 32)), RULES)  # the whole image passes


def test_interlaced_png_is_counted_pass_by_pass(tmp_path):
    rows = adam7_rows(33, 21)
    open_image(
        png(tmp_path / "whole.png", 33, 21, rows, interlace=1),
        ImageRules(size=16, min_side=16, max_pixels=10**6),
    )
    with pytest.raises(BadSample, match="ends early|truncated"):  # Pillow notices some cuts itself
        open_image(png(tmp_path / "short.png", 33, 21, rows[:-50], interlace=1), RULES)


def test_scan_turns_load_truncated_images_off(tmp_path, monkeypatch):
    data = good_image(tmp_path / "x.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library might
    problem = check_images([tmp_path / "cut.png"], RULES)[tmp_path / "cut.png"]
    assert problem is not None and problem.reason == "corrupt image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---- 7. manifest lines and folders that used to crash or hang the scan ---------------------------


def manifest(root: Path, bad: str, n_good: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    good = [
        json.dumps({"segments": [{"text": f"red {i}"}, {"image": f"img/{i}.png"}]}) for i in range(n_good)
    ]
    for i in range(n_good):
        good_image(root / "img" / f"{i}.png")
    path = root / "m.jsonl"
    path.write_text("\n".join([good[0], bad, *good[1:]]) + "\n")
    return path


def image_line(name: str) -> str:
    return json.dumps({"segments": [{"text": "a thing"}, {"image": name}]})


def train_on(capsys, tmp_path, dataset: str, *extra: str) -> tuple[int, str, str]:
    return cli(
        capsys,
        "train",
        "--recipe",
        "debug",
        "--out",
        tmp_path / "run",
        "--steps",
        "1",
        *FAST,
        f"data.dataset={dataset}",
        *extra,
    )


def skipped(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if r.name == "motfusion.data")


HALF_ROWS = rgb_rows(32, 32)[: 16 * 97]  # a complete zlib stream of half the rows: Pillow decodes it as black


def _fifo(root: Path) -> None:
    os.mkfifo(root / "img" / "pipe.png")


def _socket(root: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "img" / "sock.png"))
    s.close()


MANIFEST_CASES = {
    "nesting bomb": (None, "[" * 100_000, ["nested too deeply"]),
    "nested segment": (None, '{"segments": [' + "[" * 500 + "]" * 500 + "]}", ["segment 1"]),
    "gigantic integer": (None, '{"segments": [{"text": "x"}], "n": ' + "9" * 5000 + "}", ["digits"]),
    "infinite float as text": (None, '{"segments": [{"text": 1e999}]}', ["non-empty string"]),
    "fifo as image": (_fifo, image_line("img/pipe.png"), ["a FIFO", "not opened"]),
    "device as image": (None, image_line("/dev/null"), ["a device"]),
    "socket as image": (_socket, image_line("img/sock.png"), ["a socket"]),
    "short png": (
        lambda r: png(r / "img" / "short.png", 32, 32, HALF_ROWS),
        image_line("img/short.png"),
        ["ends early"],
    ),
    "float tiff out of range": (
        lambda r: PILImage.fromarray(np.full((32, 32), 7.0, np.float32), "F").save(r / "img" / "f.tiff"),
        image_line("img/f.tiff"),
        ["[0, 1]"],
    ),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_bad_manifest_line_is_a_file_line_bad_sample(tmp_path, capsys, caplog, no_hang, case):
    setup, line, phrases = MANIFEST_CASES[case]
    path = manifest(tmp_path / "data", line)
    if setup is not None:
        setup(tmp_path / "data")
    code, _, err = train_on(capsys, tmp_path, f"manifest:{path}")
    assert code == 2
    assert_one_line(err, f"{path}:2: ", "data.on_bad_sample=skip", *phrases)
    with caplog.at_level(logging.WARNING, logger="motfusion.data"):
        code, _, err = train_on(capsys, tmp_path, f"manifest:{path}", "data.on_bad_sample=skip")
    assert code == 0 and "skipped 1 of 4 samples" in skipped(caplog)  # counted, never silent


def test_a_manifest_of_nothing_but_bombs_is_one_line(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    path.write_text("[" * 100_000 + "\n" + "9" * 5000 + "\n")
    code, _, err = train_on(capsys, tmp_path, f"manifest:{path}", "data.on_bad_sample=skip")
    assert code == 2
    assert_one_line(err, "no usable samples", "2 invalid JSON")


def captioned_folder(root: Path, n: int = 3) -> Path:
    for i in range(n):
        good_image(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"red {i}\n")
    return root


FOLDER_CASES = {
    "dangling link": (
        lambda r: (r / "gone.png").symlink_to(r / "nowhere.png"),
        "gone.png",
        ["dangling symbolic link"],
    ),
    "link loop": (
        lambda r: ((r / "a.png").symlink_to(r / "b.png"), (r / "b.png").symlink_to(r / "a.png")),
        "a.png",
        ["symbolic links"],
    ),
    "folder loop": (
        lambda r: (r / "sub").symlink_to(r, target_is_directory=True),
        "sub",
        ["already searched"],
    ),
    "fifo image": (lambda r: os.mkfifo(r / "p.png"), "p.png", ["a FIFO"]),
    "fifo caption": (lambda r: (good_image(r / "q.png"), os.mkfifo(r / "q.txt")), "q.txt", ["a FIFO"]),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_folder_links_and_special_files_are_reported(tmp_path, capsys, caplog, no_hang, case):
    setup, name, phrases = FOLDER_CASES[case]
    root = captioned_folder(tmp_path / "data")
    setup(root)
    if case != "fifo caption" and case != "folder loop":
        (root / Path(name).with_suffix(".txt")).write_text("a caption\n")
    code, _, err = train_on(capsys, tmp_path, f"folder:{root}")
    assert code == 2
    assert_one_line(err, str(root / name), *phrases)
    with caplog.at_level(logging.WARNING, logger="motfusion.data"):
        code, _, err = train_on(capsys, tmp_path, f"folder:{root}", "data.on_bad_sample=skip")
    bad = 2 if case == "link loop" else 1  # a.png and b.png
    assert code == 0 and f"skipped {bad} of {3 + bad} samples" in skipped(caplog)


def test_a_linked_folder_of_images_is_searched(tmp_path, capsys, caplog):
    elsewhere = captioned_folder(tmp_path / "elsewhere")
    root = captioned_folder(tmp_path / "data", 1)
    (root / "more").symlink_to(elsewhere, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="motfusion.data"):
        code, out, err = train_on(capsys, tmp_path, f"folder:{root}")
    assert code == 0 and not skipped(caplog)


# ---- 8. smaller mistakes around data and sampling -----------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("gen") / "run"
    assert main(["train", "--recipe", "debug", "--out", str(run), "--steps", "1", *FAST]) == 0
    return run


@pytest.mark.parametrize("n", ["0", "-3"])
def test_generate_n_must_be_positive(ckpt, tmp_path, capsys, n):
    code, _, err = cli(capsys, "generate", "--ckpt", ckpt, "--prompt", "x", "--n", n, "--out", tmp_path / "s")
    assert code == 2
    assert_one_line(err, f"--n={n}")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("side, phrase", [(10_000, "data.max_image_pixels"), (20_000, "too large")])
def test_generate_image_size_limit_applies(ckpt, tmp_path, capsys, side, phrase):
    bomb = png(tmp_path / "bomb.png", side, side, b"", colour=0)  # a header promising side x side pixels
    code, _, err = cli(capsys, "generate", "--ckpt", ckpt, "--image", bomb)
    assert code == 2
    assert_one_line(err, str(bomb), phrase)


@pytest.mark.parametrize(
    "make, phrase",
    [
        (lambda p: p.write_bytes(b"\x89PNG not really"), "not an image"),
        (os.mkfifo, "a FIFO"),
        (lambda p: png(p, 32, 32, HALF_ROWS), "ends early"),
    ],
)
def test_generate_image_that_cannot_be_read(ckpt, tmp_path, capsys, no_hang, make, phrase):
    path = tmp_path / "in.png"
    make(path)
    code, _, err = cli(capsys, "generate", "--ckpt", ckpt, "--image", path)
    assert code == 2
    assert_one_line(err, str(path), phrase)


def test_generate_captions_a_16_bit_image(ckpt, tmp_path, capsys):
    path = ramp16(tmp_path / "ramp.png")
    code, out, _ = cli(capsys, "generate", "--ckpt", ckpt, "--image", path, "--max-tokens", "4")
    assert code == 0 and out.startswith(f"{path}\t")


def test_eval_n_must_be_positive(ckpt, capsys):
    code, _, err = cli(capsys, "eval", "--ckpt", ckpt, "--n", "0")
    assert code == 2
    assert_one_line(err, "--n=0")


@pytest.mark.parametrize(
    "write, phrase",
    [
        (lambda p: p.write_text('{"a": 1}'), "is not a tokenizers JSON file"),
        (lambda p: p.write_bytes(os.urandom(200)), "is not a tokenizers JSON file"),
        (lambda p: HFTokenizer(models.BPE()).save(str(p)), "lacks the special tokens"),
    ],
)
def test_data_tokenizer_that_is_not_a_tokenizer(tmp_path, capsys, write, phrase):
    path = tmp_path / "tok.json"
    write(path)
    code, _, err = train_on(capsys, tmp_path, "shapes", f"data.tokenizer={path}")
    assert code == 2
    assert_one_line(err, str(path), phrase)


def test_seq_len_shorter_than_every_document(tmp_path, capsys):
    code, _, err = train_on(capsys, tmp_path, "shapes", "train.seq_len=8")
    assert code == 2
    assert_one_line(err, "train.seq_len=8")
    assert list_checkpoints(tmp_path / "run") == []


@pytest.mark.parametrize(
    "option, value",
    [
        ("--guidance", "nan"),
        ("--guidance-early", "inf"),
        ("--temperature", "nan"),
        ("--top-p", "nan"),
        ("--temperature", "inf"),
        ("--steps", "0"),
        ("--best-of", "0"),
    ],
)
def test_sampling_numbers_must_be_finite_and_in_range(ckpt, tmp_path, capsys, option, value):
    code, _, err = cli(
        capsys, "generate", "--ckpt", ckpt, "--prompt", "x", option, value, "--out", tmp_path / "s"
    )
    assert code == 2
    assert_one_line(err, option)
