"""Checking user data before training: every sample once, up front, each problem named by file and line.

A training run must never learn from a broken file without saying so. Datasets built from user files
(data/user.py) run these checks on every sample when they are built: documents are parsed, text is
decoded and tokenized to check it fits train.seq_len, and every image is opened and fully decoded
(in a thread pool; Pillow decodes without the GIL), its pixel format converted to RGB, and a PNG's
pixel data counted, because Pillow decodes a PNG whose data ends early as black without a word.
Only regular files are opened, so a FIFO or a device named as an image cannot hang the scan. What fails is a `Problem` with a reason (the
category counted in reports) and a location. `data.on_bad_sample=error` stops on them with one
`DataError`; `skip` drops them, logs one line of counts, and trains on the rest. The decision is
made once, from the files alone, so the list of kept samples (and with it index -> sample) is
deterministic.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image as PILImage
from PIL import ImageFile, ImageOps, UnidentifiedImageError

from motfusion.config import DataConfig
from motfusion.data.images import from_pil, to_rgb
from motfusion.errors import DataError

log = logging.getLogger("motfusion.data")


@dataclass(frozen=True)
class Problem:
    """Why one sample cannot be used: `reason` is the category counted in reports."""

    reason: str
    path: Path
    line: int | None
    detail: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.detail}"


class BadSample(Exception):
    """Raised by the checks below; the dataset adds the location and turns it into a `Problem`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail

    def at(self, path: Path, line: int | None = None) -> Problem:
        return Problem(self.reason, path, line, self.detail)


@dataclass(frozen=True, kw_only=True)
class ImageRules:
    """How images are checked and loaded: square `size` output, accepted input sizes."""

    size: int
    min_side: int
    max_pixels: int

    @classmethod
    def from_config(cls, d: DataConfig) -> ImageRules:
        return cls(
            size=d.image_size, min_side=d.min_image_size or d.image_size, max_pixels=d.max_image_pixels
        )


# ---- decoding -----------------------------------------------------------------------------------


def decode_utf8(data: bytes, multiline: bool = True) -> str:
    """bytes -> str, or BadSample("not UTF-8") naming the (line and) column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        where = f"line {line}, column {column}" if multiline else f"column {column}"
        raise BadSample(
            "not UTF-8", f"byte 0x{data[e.start]:02x} at {where} is not UTF-8 (save the file as UTF-8)"
        ) from None


def check_regular(path: Path) -> None:
    """BadSample unless `path` is a regular file (after links); never opens it, so a FIFO cannot block."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        kind = "a link to nothing" if os.path.islink(path) else None
        raise BadSample(
            "missing file", f"{kind} (dangling symbolic link)" if kind else "file does not exist"
        ) from None
    except OSError as e:  # ELOOP: a link loop; ENAMETOOLONG, EACCES...
        raise BadSample("unreadable file", f"cannot reach the file: {e.strerror or e}") from None
    except ValueError:  # a path Python cannot pass to the OS, e.g. with a NUL byte
        raise BadSample("unreadable file", "the path holds a NUL byte") from None
    if not stat.S_ISREG(mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise BadSample("not a regular file", f"is {kind}, not a regular file; it was not opened")


def read_bytes(path: Path) -> bytes:
    check_regular(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadSample("missing file", "file does not exist") from None
    except OSError as e:
        raise BadSample("unreadable file", f"cannot read the file: {e.strerror or e}") from None


def open_image(path: Path, rules: ImageRules) -> PILImage.Image:
    """Open and fully decode `path`, or raise BadSample saying why it cannot be trained on.

    The size limits are checked on the header, before decoding. JPEGs decode at a reduced scale
    that is still at least `rules.size` (Pillow's draft mode), which is most of the speed of a scan.
    """
    check_regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # max_pixels is checked below
            pic = PILImage.open(path)
    except FileNotFoundError:
        raise BadSample("missing file", "image file does not exist") from None
    except PILImage.DecompressionBombError as e:
        raise BadSample("image too large", f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise BadSample(
            "corrupt image", "not an image Pillow can read (corrupt, or an unsupported format)"
        ) from None
    except (OSError, ValueError) as e:  # ValueError: a path Python cannot open, e.g. with a NUL byte
        raise BadSample(
            "unreadable file", f"cannot read the image file: {getattr(e, 'strerror', None) or e}"
        ) from None
    with pic:
        w, h = pic.size
        if w * h > rules.max_pixels:
            raise BadSample(
                "image too large",
                f"image is {w}x{h} = {w * h} pixels, more than data.max_image_pixels={rules.max_pixels}",
            )
        if min(w, h) < rules.min_side:
            raise BadSample(
                "image too small",
                f"image is {w}x{h}, its shorter side is below {rules.min_side} "
                "pixels (data.min_image_size; 0 means data.image_size)",
            )
        try:
            pic.draft("RGB", (rules.size, rules.size))
            pic.load()
        except (
            Exception
        ) as e:  # Pillow reports bad pixel data as OSError, SyntaxError, ValueError, EOFError...
            raise BadSample("corrupt image", f"image is truncated or corrupt: {e}") from None
        if pic.format == "PNG":
            check_png_pixels(path)
        try:
            to_rgb(pic)
        except ValueError as e:
            raise BadSample("unsupported pixels", str(e)) from None
    return pic


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def check_png_pixels(path: Path) -> None:
    """BadSample if a PNG's IDAT data inflates to fewer bytes than its header promises.

    A complete zlib stream that holds too few rows is not an error to Pillow: it decodes the image
    and leaves the missing rows black. Counting the inflated bytes (in 1 MiB pieces) catches it."""
    data = path.read_bytes()
    pos, header, inflater, got = 8, None, zlib.decompressobj(), 0
    try:
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos : pos + 8])
            body = data[pos + 8 : pos + 8 + length]
            if kind == b"IHDR":
                header = body
            elif kind == b"IDAT":
                while body:
                    got += len(inflater.decompress(body, 1 << 20))
                    body = inflater.unconsumed_tail
            elif kind == b"IEND":
                break
            pos += 12 + length
    except zlib.error as e:
        raise BadSample("corrupt image", f"PNG pixel data is corrupt: {e}") from None
    if header is None or len(header) < 13 or header[9] not in _PNG_CHANNELS:
        return  # Pillow judged the header when it decoded the image
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header[:13])
    bits = _PNG_CHANNELS[colour] * depth
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    sizes = [(-(-(w - x) // dx), -(-(h - y) // dy)) for x, y, dx, dy in passes if w > x and h > y]
    expected = sum(rows * (1 + (cols * bits + 7) // 8) for cols, rows in sizes)
    if got < expected:
        raise BadSample(
            "corrupt image",
            f"PNG pixel data ends early: {got} of {expected} bytes, so "
            f"{100 * (expected - got) // expected}% of the image is missing (truncated?)",
        )


def to_pixels(pic: PILImage.Image, size: int) -> torch.Tensor:
    """A decoded picture -> (3, size, size) in [-1, 1]: upright (EXIF), RGB, center square crop, resize."""
    pic = to_rgb(ImageOps.exif_transpose(pic))
    pic = ImageOps.fit(pic, (size, size), method=PILImage.Resampling.BICUBIC)
    return from_pil(pic)  # (3, S, S)


def load_pixels(path: Path, rules: ImageRules) -> torch.Tensor:
    """An image file -> (3, S, S) in [-1, 1]. Raises DataError if it broke after the scan."""
    try:
        return to_pixels(open_image(path, rules), rules.size)
    except BadSample as e:
        raise DataError(
            f"{path}: {e.detail} (it passed the check when training started: did the file change?)",
            e.at(path),
        ) from None


def read_image(path: Path, rules: ImageRules) -> torch.Tensor:
    """An image a user names (e.g. `generate --image`) -> (3, S, S) in [-1, 1], under the same checks
    as training data (data.max_image_pixels included); DataError naming the file if it fails them."""
    try:
        return to_pixels(open_image(path, rules), rules.size)
    except BadSample as e:
        raise DataError(f"{path}: {e.detail}", e.at(path)) from None


def check_images(paths: Iterable[Path], rules: ImageRules) -> dict[Path, BadSample | None]:
    """Open and decode each distinct path once, in parallel; path -> its problem, or None."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # set by some other code: it would decode cut files as black
        log.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was on; motfusion turned it off to find truncated images"
        )
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    unique = list(dict.fromkeys(paths))

    def check(path: Path) -> BadSample | None:
        try:
            open_image(path, rules)
        except BadSample as e:
            return e
        return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(unique, pool.map(check, unique)))


# ---- the decision -------------------------------------------------------------------------------


@dataclass
class ScanReport:
    """The outcome of one scan: how many samples were read and which were bad, in file order."""

    source: str  # e.g. "manifest data/train.jsonl"
    total: int
    problems: list[Problem]

    @property
    def kept(self) -> int:
        return self.total - len(self.problems)

    def counts(self) -> dict[str, int]:
        """reason -> number of bad samples, most frequent first."""
        return count_reasons(self.problems)


def count_reasons(problems: list[Problem]) -> dict[str, int]:
    return dict(Counter(p.reason for p in problems).most_common())


def counts_text(problems: list[Problem]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in count_reasons(problems).items())


def enforce(report: ScanReport, on_bad_sample: str) -> None:
    """Apply data.on_bad_sample: raise on any problem (error), or log the counts (skip).

    Either way nothing is left silent: an empty result is an error too.
    """
    problems = report.problems
    if problems and on_bad_sample == "error":
        first, rest = problems[0], len(problems) - 1
        more = f"; {rest} more bad sample(s): {counts_text(problems[1:])}" if rest else ""
        raise DataError(
            f"{first}{more}. Fix the data, or set data.on_bad_sample=skip to train on the rest", first
        )
    if report.kept == 0:
        raise DataError(
            f"{report.source}: no usable samples"
            + (
                f": all {report.total} are bad ({counts_text(problems)}); first: {problems[0]}"
                if problems
                else ""
            ),
            problems[0] if problems else None,
        )
    if problems:
        log.warning(
            f"data: {report.source}: skipped {len(problems)} of {report.total} samples "
            f"({counts_text(problems)}); first: {problems[0]}"
        )
