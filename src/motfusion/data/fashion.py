"""Fashion-MNIST: 70k grayscale 28x28 pictures of clothing in 10 classes, read from its IDX files.

The Debian package `dataset-fashion-mnist` installs the four files (gzipped) under
/usr/share/datasets/fashion-mnist; `data.dataset=fashion:PATH` reads them from another folder,
gzipped or not. The train split is the 60k train file, val the 10k test file.

Each sample's caption names its class through one of a few templates ("a coat", "a photo of an
ankle boot", ...); the template is a pure function of (split, index), so the dataset is
deterministic like every other.
"""

from __future__ import annotations

import functools
import gzip
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from motfusion.data.images import from_uint8
from motfusion.errors import DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_PACKAGE = "dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The dataset's label order. Noun phrases as a caption says them; KEYWORDS are what a caption
# must contain to name the class (checked as whole words, so "shirt" is not found in "t-shirt").
CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
NOUN_PHRASES = (
    "a t-shirt",
    "a pair of trousers",
    "a pullover",
    "a dress",
    "a coat",
    "a sandal",
    "a shirt",
    "a sneaker",
    "a bag",
    "an ankle boot",
)
KEYWORDS = (
    ("t-shirt",),
    ("trouser", "trousers", "pants"),
    ("pullover", "sweater"),
    ("dress",),
    ("coat", "jacket"),
    ("sandal", "sandals"),
    ("shirt",),
    ("sneaker", "sneakers"),
    ("bag", "handbag"),
    ("ankle boot", "boot", "boots"),
)
TEMPLATES = ("{}", "a photo of {}", "a picture of {}", "a grayscale photo of {}", "{} on a black background")

# IDX type codes -> numpy dtypes; multi-byte values are big-endian.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (plain or gzipped, told apart by its magic bytes) -> array of its shape.

    Layout: two zero bytes, a type code, the number of dimensions n, then n big-endian int32
    sizes, then the values in C order.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip file: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    header = 4 + 4 * raw[3]
    if len(raw) < header:
        raise DataError(f"{path}: IDX header is truncated")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=raw[3], offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header says shape {shape} ({expected} bytes), but the file holds {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx(root: Path, stem: str) -> Path:
    """root/stem or root/stem.gz; a missing file names the package that provides it."""
    for name in (stem, stem + ".gz"):
        if (Path(root) / name).is_file():
            return Path(root) / name
    hint = (
        f"install it with `apt-get install {FASHION_PACKAGE}`"
        if Path(root) == FASHION_DIR
        else f"or use data.dataset=fashion for the files of `apt-get install {FASHION_PACKAGE}`"
    )
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {root}; {hint}")


@functools.lru_cache(maxsize=4)
def load_fashion(root: Path = FASHION_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of a split; read once per (root, split)."""
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}; choose from {list(FILES)}")
    images_file, labels_file = FILES[split]
    images, labels = read_idx(find_idx(root, images_file)), read_idx(find_idx(root, labels_file))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.size and not 0 <= labels.min() <= labels.max() < len(CLASSES):
        raise DataError(f"{root}: {split} labels outside 0..{len(CLASSES) - 1}")
    return images, labels.astype(np.int64)


def to_model_image(gray: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(h, w) uint8 grayscale -> (3, size, size) float in [-1, 1] (antialiased resize)."""
    x = from_uint8(gray)[None, None]  # (1, 1, h, w)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].expand(3, size, size).clamp(-1, 1).contiguous()  # (3, size, size)


def caption_for(label: int, template: int = 0) -> str:
    return TEMPLATES[template % len(TEMPLATES)].format(NOUN_PHRASES[label])


def classes_named(caption: str) -> set[int]:
    """The classes a caption names, by whole-word keyword ("t-shirt" does not also name "shirt")."""
    text = caption.lower()
    found = set()
    for label, words in enumerate(KEYWORDS):
        if any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text) for w in words):
            found.add(label)
    return found


def caption_names_class(caption: str, label: int) -> bool:
    """A caption is right when it names the sample's class and no other."""
    return classes_named(caption) == {label}


@dataclass(frozen=True)
class FashionSample:
    image: torch.Tensor  # (3, H, W) in [-1, 1]
    caption: str
    label: int


class FashionDataset:
    """Fashion-MNIST as (image, caption, label) samples; finite: `len()` items, indexed 0..len-1."""

    def __init__(self, *, root: Path = FASHION_DIR, split: str = "train", image_size: int = 28):
        self.root, self.split, self.image_size = Path(root), split, image_size
        self.images, self.labels = load_fashion(self.root, split)
        self._stream = zlib.crc32(f"fashion/{split}".encode())

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def class_prompts(self) -> list[str]:
        """One caption per class, in label order ("a photo of a coat", ...): zero-shot classification."""
        return [caption_for(label, 1) for label in range(len(CLASSES))]

    def sample(self, index: int) -> FashionSample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside the {len(self)} {self.split} images")
        label = int(self.labels[index])
        rng = np.random.default_rng(np.random.SeedSequence([self._stream, index]))
        caption = caption_for(label, int(rng.integers(len(TEMPLATES))))
        return FashionSample(to_model_image(self.images[index], self.image_size), caption, label)
