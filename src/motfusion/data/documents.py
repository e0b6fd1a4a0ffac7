"""What every dataset shares: the split seeds, the per-document random stream, and the turning of an
(image, caption) sample into a document, caption first or image first."""

from __future__ import annotations

import zlib
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from motfusion.config import Config, DataConfig, ObjectiveConfig
from motfusion.sequence import (
    Document,
    Image,
    Text,
)

SPLITS = ("train", "val")


VAL_SEED = 0  # the val split is the same for every run, so val losses compare across seeds


class Sample(Protocol):
    image: torch.Tensor  # (C, H, W) in [-1, 1]
    caption: str


class PairDataset(Protocol):
    """(image, caption) pairs: the pipeline lays each out as a document (`document_for`)."""

    def sample(self, index: int) -> Sample: ...


@runtime_checkable
class DocumentDataset(Protocol):
    """Ready documents, e.g. a user's interleaved ones. `rng` is the document's own (seed, split,
    stream index) generator, for any random choice the dataset makes in laying it out."""

    def document(self, index: int, rng: np.random.Generator) -> Document: ...


def document_for(
    sample: Sample, rng: np.random.Generator, data_cfg: DataConfig, objective_cfg: ObjectiveConfig
) -> Document:
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
