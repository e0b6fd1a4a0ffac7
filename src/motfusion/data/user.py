"""Datasets from a user's own files: a JSONL manifest of interleaved documents, or a folder of captioned images.

    data.dataset=manifest:PATH   one JSON document per line, e.g.
        {"segments": [{"text": "a cat"}, {"image": "img/cat.png"}, {"text": "on a mat"}]}
        image paths are relative to the manifest's folder; other keys of the object are ignored.
    data.dataset=folder:PATH     every image under PATH (.png .jpg .jpeg .webp .bmp, searched
        recursively through links to folders, hidden files skipped) with its caption in a .txt file
        of the same stem. Links to nothing, link loops and image names that are not regular files
        are bad samples, reported like any other.

Both are checked in full when built (data/scan.py). Images are loaded lazily: RGB, EXIF-upright,
center-cropped to a square, resized to data.image_size, scaled to [-1, 1].

Splits: a sample goes to val when a hash of its key (the manifest line's bytes, or the image's path
relative to the folder) falls below data.val_fraction, else to train. The assignment depends on
nothing else, so it stays put when other lines are added, removed or reordered.

Index -> sample: sample i is the i-th kept sample of the split, in file order (folders: sorted by
relative path); the pipeline's EpochOrder shuffles epochs. Which samples are kept is decided by the
scan from the files alone, so index -> sample is a pure function of the files, and resuming or
sharding by document index stays exact as long as the files do not change.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch

from motfusion.config import Config
from motfusion.data.scan import (
    BadSample,
    ImageRules,
    Problem,
    ScanReport,
    check_images,
    decode_utf8,
    enforce,
    load_pixels,
    read_bytes,
)
from motfusion.errors import ConfigError, DataError
from motfusion.sequence import MODALITIES, Document, Image, Text, encode_document
from motfusion.tokenizer import Tokenizer, length_tokenizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SEGMENT_KEYS = ("text", "image")  # what a manifest segment may hold

Item = TypeVar("Item")


def in_val(key: bytes, val_fraction: float) -> bool:
    """Whether the sample with this key is held out: a stable hash, uniform in [0, 1)."""
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


@dataclass(frozen=True)
class Scanned(Generic[Item]):
    """One sample as the scan saw it: its key for the split hash, and its parse or its problem."""

    key: bytes
    item: Item | None
    problem: Problem | None


def select(scanned: list[Scanned[Item]], report: ScanReport, cfg: Config, split: str) -> list[Item]:
    """Apply data.on_bad_sample, then keep the good items of `split`; an empty split is an error."""
    enforce(report, cfg.data.on_bad_sample)
    good = [s for s in scanned if s.problem is None]
    items = [s.item for s in good if in_val(s.key, cfg.data.val_fraction) == (split == "val")]
    if not items:
        n_val = sum(in_val(s.key, cfg.data.val_fraction) for s in good)
        raise DataError(
            f"{report.source}: the {split} split is empty ({len(good) - n_val} train, {n_val} val of "
            f"{len(good)} usable samples at data.val_fraction={cfg.data.val_fraction}); add samples "
            "or change data.val_fraction"
        )
    return items


def fits(doc: Document, cfg: Config, tokenizer: Tokenizer) -> BadSample | None:
    """The document's encoded length against train.seq_len (every image has data.image_size)."""
    n = len(encode_document(doc, tokenizer, cfg.model.patch_size))
    if n > cfg.train.seq_len:
        return BadSample(
            "too long for train.seq_len",
            f"the document encodes to {n} positions, more than "
            f"train.seq_len={cfg.train.seq_len}; shorten it or raise train.seq_len",
        )
    return None


def placeholder(cfg: Config) -> Image:
    """An image segment of the trained size, to measure encoded lengths without loading pixels."""
    size = cfg.data.image_size
    return Image(torch.zeros(cfg.model.image_channels, size, size))


def user_path(arg: str, kind: str, want_dir: bool) -> Path:
    if not arg:
        raise ConfigError(f"data.dataset={kind} needs a path: data.dataset={kind}:PATH")
    path = Path(arg).expanduser()
    if not (path.is_dir() if want_dir else path.is_file()):
        what = "folder" if want_dir else "file"
        raise DataError(f"data.dataset={kind}:{arg}: {path} is not an existing {what}")
    return path


# ---- manifest -----------------------------------------------------------------------------------

ManifestDoc = tuple[Text | Path, ...]  # text segments as they are, images as resolved paths


def preview(value: object) -> str:
    """A short JSON rendering of a user's value for a message, whatever it holds."""
    try:
        return json.dumps(value)[:80]
    except (ValueError, RecursionError):  # e.g. nested too deeply to render
        return f"a deeply nested {type(value).__name__}"


def parse_segment(i: int, seg: object, root: Path) -> Text | Path:
    if not isinstance(seg, dict) or len(seg) != 1:
        raise BadSample(
            "bad document",
            f"segment {i} must be an object with one key, one of {list(SEGMENT_KEYS)}; got {preview(seg)}",
        )
    ((kind, value),) = seg.items()
    if kind not in SEGMENT_KEYS:
        if kind == "audio" and "speech" not in MODALITIES:
            raise BadSample(
                "unknown segment type",
                f"segment {i} is 'audio', but speech is not available yet "
                f"(no speech modality is registered); use {list(SEGMENT_KEYS)}",
            )
        if kind == "audio":  # speech units need a trained speech tokenizer, which only speech:DIR data has
            raise BadSample(
                "unknown segment type",
                f"segment {i} is 'audio', but speech is not available in "
                f"manifests yet (train speech with data.dataset=speech:DIR); "
                f"use {list(SEGMENT_KEYS)}",
            )
        raise BadSample(
            "unknown segment type",
            f"segment {i} has unknown segment type {kind!r}; manifests support {list(SEGMENT_KEYS)}",
        )
    if not isinstance(value, str) or (kind == "image" and not value):
        raise BadSample(
            "bad document", f"segment {i}: {kind!r} must be a non-empty string, got {preview(value)}"
        )
    if kind == "image":
        return root / value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a JSON escape such as "\udc80" decodes to a lone surrogate
        raise BadSample(
            "not UTF-8", f"segment {i}: text holds {value[e.start]!r}, which is not valid Unicode"
        ) from None
    return Text(value)


def parse_line(raw: bytes, root: Path) -> ManifestDoc:
    """One manifest line -> its segments, or BadSample."""
    try:
        obj = json.loads(decode_utf8(raw, multiline=False))
    except json.JSONDecodeError as e:
        raise BadSample("invalid JSON", f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise BadSample("invalid JSON", "JSON nested too deeply to parse") from None
    except (
        ValueError
    ) as e:  # e.g. an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise BadSample("invalid JSON", f"JSON Python cannot parse: {str(e).split(';')[0]}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("segments"), list):
        raise BadSample(
            "bad document", 'expected an object like {"segments": [{"text": "..."}, {"image": "a.png"}]}'
        )
    doc = tuple(parse_segment(i, seg, root) for i, seg in enumerate(obj["segments"], 1))
    if not any(isinstance(s, Path) or s.text for s in doc):
        raise BadSample("empty document", "empty document: it has no image and no text")
    return doc


def read_manifest(path: Path, cfg: Config) -> list[tuple[int, bytes, ManifestDoc | BadSample]]:
    """(line number, line bytes, parsed document or its problem) for every non-blank line."""
    tokenizer, image = length_tokenizer(cfg.data.tokenizer), placeholder(cfg)
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"cannot read manifest {path}: {e.strerror or e}") from None
    lines = []
    with f:
        for line, raw in enumerate(f, 1):
            raw = (raw.removeprefix(b"\xef\xbb\xbf") if line == 1 else raw).strip()  # a UTF-8 byte order mark
            if not raw:
                continue
            try:
                doc = parse_line(raw, path.parent)
                lines.append(
                    (
                        line,
                        raw,
                        fits([image if isinstance(s, Path) else s for s in doc], cfg, tokenizer) or doc,
                    )
                )
            except BadSample as e:
                lines.append((line, raw, e))
            except Exception as e:  # whatever else a line can do, it is that line's problem, not the scan's
                lines.append(
                    (
                        line,
                        raw,
                        BadSample(
                            "bad document", f"cannot read this line: {type(e).__name__}: {str(e)[:120]}"
                        ),
                    )
                )
    return lines


def scan_manifest(path: Path, cfg: Config) -> tuple[list[Scanned[ManifestDoc]], ScanReport]:
    """Check every line, then decode every image it names in one parallel pass."""
    lines = read_manifest(path, cfg)
    docs = [doc for *_, doc in lines if not isinstance(doc, BadSample)]
    images = check_images(
        [s for doc in docs for s in doc if isinstance(s, Path)], ImageRules.from_config(cfg.data)
    )
    scanned = []
    for line, key, doc in lines:
        if not isinstance(doc, BadSample):
            bad_image = next((s for s in doc if isinstance(s, Path) and images[s] is not None), None)
            if bad_image is not None:
                doc = BadSample(images[bad_image].reason, f"{bad_image}: {images[bad_image].detail}")
        if isinstance(doc, BadSample):
            scanned.append(Scanned(key, None, doc.at(path, line)))
        else:
            scanned.append(Scanned(key, doc, None))
    return scanned, ScanReport(f"manifest {path}", len(scanned), [s.problem for s in scanned if s.problem])


class ManifestDataset:
    """Interleaved documents from a JSONL manifest; `document(index, rng)` builds document `index`.

    Classifier-free guidance, as for pairs: a document that opens with text followed by an image
    loses that opening text with probability objective.cfg_dropout.
    """

    def __init__(self, docs: list[ManifestDoc], cfg: Config, report: ScanReport | None = None):
        self.docs, self.rules, self.cfg_dropout = (
            docs,
            ImageRules.from_config(cfg.data),
            cfg.objective.cfg_dropout,
        )
        self.report = report

    @classmethod
    def build(cls, cfg: Config, split: str, arg: str) -> ManifestDataset:
        scanned, report = scan_manifest(user_path(arg, "manifest", want_dir=False), cfg)
        return cls(select(scanned, report, cfg, split), cfg, report)

    def __len__(self) -> int:
        return len(self.docs)

    def document(self, index: int, rng: np.random.Generator) -> Document:
        doc = self.docs[index]
        opens_with_caption = len(doc) > 1 and isinstance(doc[0], Text) and isinstance(doc[1], Path)
        if opens_with_caption and rng.random() < self.cfg_dropout:
            doc = doc[1:]
        return [Image(load_pixels(s, self.rules)) if isinstance(s, Path) else s for s in doc]


# ---- image folder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    image: torch.Tensor  # (3, S, S) in [-1, 1]
    caption: str


def find_images(root: Path) -> tuple[list[Path], list[Problem]]:
    """Image names under root, recursively (through links to folders), hidden ones skipped, sorted by
    relative path; and the folders not searched: unreadable ones, and links back to a folder already
    searched (a loop, or a second way in), each a Problem. Names that turn out not to be regular
    files (links to nothing, link loops, FIFOs) are listed: the image check reports them."""
    found, problems, seen, stack = [], [], {(root.stat().st_dev, root.stat().st_ino)}, [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            problems.append(
                Problem("unreadable file", folder, None, f"cannot list the folder: {e.strerror or e}")
            )
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            try:
                info = entry.stat() if entry.is_dir() else None  # follows links
            except OSError:
                info = None
            if info is None:
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(path)
            elif (info.st_dev, info.st_ino) in seen:
                problems.append(
                    Problem(
                        "link loop",
                        path,
                        None,
                        "links to a folder already searched (a loop, or a second way in); not searched again",
                    )
                )
            else:
                seen.add((info.st_dev, info.st_ino))
                stack.append(path)
    return (
        sorted(found, key=lambda p: p.relative_to(root).as_posix()),
        sorted(problems, key=lambda p: p.path.relative_to(root).as_posix()),
    )


def read_caption(caption: Path) -> str:
    try:
        text = decode_utf8(read_bytes(caption)).removeprefix("\ufeff").strip()
    except BadSample as e:
        if e.reason == "missing file":
            raise BadSample(
                "missing caption", "missing caption file: every image needs a .txt of the same name beside it"
            ) from None
        raise
    if not text:
        raise BadSample("empty document", "the caption is empty")
    return text


def scan_folder(root: Path, cfg: Config) -> tuple[list[Scanned[tuple[Path, str]]], ScanReport]:
    images, unsearched = find_images(root)
    if not images:
        raise DataError(
            f"data.dataset=folder:{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    tokenizer, image = length_tokenizer(cfg.data.tokenizer), placeholder(cfg)
    checked = check_images(images, ImageRules.from_config(cfg.data))
    scanned = []
    for path in images:
        key, caption_path = path.relative_to(root).as_posix().encode(), path.with_suffix(".txt")
        try:
            caption = read_caption(caption_path)
        except BadSample as e:
            scanned.append(Scanned(key, None, e.at(caption_path)))
            continue
        too_long = fits([Text(caption), image], cfg, tokenizer)
        bad = (too_long.at(caption_path) if too_long else None) or (
            checked[path].at(path) if checked[path] else None
        )
        scanned.append(Scanned(key, None if bad else (path, caption), bad))
    scanned += [Scanned(p.path.relative_to(root).as_posix().encode(), None, p) for p in unsearched]
    return scanned, ScanReport(f"folder {root}", len(scanned), [s.problem for s in scanned if s.problem])


class FolderDataset:
    """(image, caption) pairs from a folder; the pipeline lays them out like shapes (document_for)."""

    def __init__(self, pairs: list[tuple[Path, str]], cfg: Config, report: ScanReport | None = None):
        self.pairs, self.rules, self.report = pairs, ImageRules.from_config(cfg.data), report

    @classmethod
    def build(cls, cfg: Config, split: str, arg: str) -> FolderDataset:
        scanned, report = scan_folder(user_path(arg, "folder", want_dir=True), cfg)
        return cls(select(scanned, report, cfg, split), cfg, report)

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, index: int) -> Pair:
        path, caption = self.pairs[index]
        return Pair(load_pixels(path, self.rules), caption)
