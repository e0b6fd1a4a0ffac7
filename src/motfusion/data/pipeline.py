"""From a dataset to the Packer: a deterministic stream of encoded mixed-modal documents.

Document `i` of a split is a pure function of (seed, split, i): its sample comes from the dataset's
`sample(i)` and its layout (caption first or image first, caption dropped or kept) from a numpy
Generator seeded by the same triple. Nothing depends on what was drawn before, so resuming from a
document index, or sharding documents across ranks, reproduces exactly the same documents.
"""

from __future__ import annotations

import zlib
from typing import Callable, Protocol

import numpy as np
import torch

from motfusion.config import Config, ConfigError, DataConfig, ObjectiveConfig
from motfusion.data.shapes import ShapesDataset
from motfusion.sequence import Document, EncodedDoc, Image, Packer, Text, encode_document
from motfusion.tokenizer import Tokenizer

SPLITS = ("train", "val")
VAL_SEED = 0  # the val split is the same for every run, so val losses compare across seeds


class Sample(Protocol):
    image: torch.Tensor  # (C, H, W) in [-1, 1]
    caption: str


class Dataset(Protocol):
    def sample(self, index: int) -> Sample: ...


def document_for(sample: Sample, rng: np.random.Generator, data_cfg: DataConfig,
                 objective_cfg: ObjectiveConfig) -> Document:
    """Lay out one (image, caption) pair as a training document.

    With probability `data.caption_first_prob` the caption comes first (text-to-image), else the
    image does (captioning; the objective caps its noise). Classifier-free guidance is trained
    here, not in the model: a caption-first document loses its caption with probability
    `objective.cfg_dropout`, and the unconditional document is then just [Image]. At sampling
    time the unconditional branch is the same sequence with no caption before BOI.
    """
    image = Image(sample.image)
    if rng.random() >= data_cfg.caption_first_prob:
        return [image, Text(sample.caption)]
    if rng.random() < objective_cfg.cfg_dropout:
        return [image]
    return [Text(sample.caption), image]


def split_seed(cfg: Config, split: str) -> int:
    """train follows train.seed; val is fixed (VAL_SEED) so every run is scored on the same docs."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    return cfg.train.seed if split == "train" else VAL_SEED


def document_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # The "documents/" tag keeps this stream apart from the dataset's own (seed, split, index) stream.
    stream = zlib.crc32(f"documents/{split}".encode())
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


# Dataset registry: `data.dataset` is "NAME" or "NAME:ARG" (e.g. a path); each builder takes
# (cfg, split, arg). A new dataset registers one entry here.
DatasetBuilder = Callable[[Config, str, str], Dataset]
DATASETS: dict[str, DatasetBuilder] = {}


def _shapes(cfg: Config, split: str, arg: str) -> Dataset:
    d = cfg.data
    return ShapesDataset(image_size=d.image_size, seed=split_seed(cfg, split), split=split,
                         max_objects=d.max_objects, single_object_prob=d.single_object_prob)


DATASETS["shapes"] = _shapes


def build_dataset(cfg: Config, split: str) -> Dataset:
    """The dataset named by `data.dataset`: "NAME" or "NAME:ARG"."""
    name, _, arg = cfg.data.dataset.partition(":")
    if name not in DATASETS:
        raise ConfigError(f"data.dataset={cfg.data.dataset!r}: unknown dataset {name!r}; available: {sorted(DATASETS)}")
    return DATASETS[name](cfg, split, arg)


class DocumentStream:
    """index -> EncodedDoc, a pure function of (seed, split, index).

    The Packer asks again for the document that did not fit at the end of a row, so the last
    document is memoized; that changes no result, only skips re-rendering it.
    """

    def __init__(self, dataset: Dataset, tokenizer: Tokenizer, cfg: Config, split: str):
        self.dataset, self.tokenizer, self.cfg, self.split = dataset, tokenizer, cfg, split
        self.seed = split_seed(cfg, split)
        self._last: tuple[int, EncodedDoc] | None = None

    def document(self, index: int) -> Document:
        rng = document_rng(self.seed, self.split, index)
        return document_for(self.dataset.sample(index), rng, self.cfg.data, self.cfg.objective)

    def __call__(self, index: int) -> EncodedDoc:
        if self._last is None or self._last[0] != index:
            self._last = (index, encode_document(self.document(index), self.tokenizer, self.cfg.model.patch_size))
        return self._last[1]


def make_packer(cfg: Config, tokenizer: Tokenizer, split: str = "train", rank: int = 0,
                world_size: int = 1) -> Packer:
    """Packed (train.batch_size, train.seq_len) batches of `split` for one rank.

    Rank r takes documents r, r + W, r + 2W, ... (W = world_size): across ranks every document is
    used once, with no duplicates and no gaps.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    stream = DocumentStream(build_dataset(cfg, split), tokenizer, cfg, split)
    return Packer(stream, cfg.train.batch_size, cfg.train.seq_len, tokenizer.pad, start=rank, stride=world_size)
