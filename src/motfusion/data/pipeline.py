"""From a dataset to the Packer: a deterministic stream of encoded mixed-modal documents.

Document `i` of a split is a pure function of (seed, split, i): its sample comes from the dataset's
`sample(i)` (a dataset of ready documents gives `document(i, rng)` instead) and its layout (caption first or image first, caption dropped or kept) from a numpy
Generator seeded by the same triple. Nothing depends on what was drawn before, so resuming from a
document index, or sharding documents across ranks, reproduces exactly the same documents.
A finite dataset (one with `len()`) is read epoch after epoch, each epoch in its own permutation
seeded by (seed, epoch), so the stream index still grows forever and stays a pure function.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sized
from pathlib import Path

import numpy as np

from motfusion.codecs.image import image_repr
from motfusion.config import Config, DataConfig, TrainConfig
from motfusion.data.documents import (
    DocumentDataset,
    PairDataset,
    document_for,
    document_rng,
    split_seed,
)
from motfusion.data.edits import EDIT_DATASETS, ShapesEditDataset
from motfusion.data.emoji import EMOJI_FONT, EmojiDataset
from motfusion.data.fashion import FASHION_DIR, FashionDataset
from motfusion.data.shapes import ShapesDataset
from motfusion.data.speech import SpeechDataset
from motfusion.data.user import FolderDataset, ManifestDataset
from motfusion.errors import ConfigError
from motfusion.sequence import (
    Document,
    EncodedDoc,
    Packer,
    Text,
    encode_document,
)
from motfusion.tokenizer import Tokenizer

Dataset = PairDataset | DocumentDataset


# Dataset registry: `data.dataset` is "NAME" or "NAME:ARG" (e.g. a path); each builder takes
# (cfg, split, arg). A new dataset registers one entry here.
DatasetBuilder = Callable[[Config, str, str], Dataset]
DATASETS: dict[str, DatasetBuilder] = {}


def _shapes(cfg: Config, split: str, arg: str) -> Dataset:
    d = cfg.data
    return ShapesDataset(
        image_size=d.image_size,
        seed=split_seed(cfg, split),
        split=split,
        max_objects=d.max_objects,
        single_object_prob=d.single_object_prob,
        size_prob=d.caption_size_prob,
        position_prob=d.caption_position_prob,
        gap=d.object_gap or None,
    )


def _shapes_edit(cfg: Config, split: str, arg: str) -> Dataset:
    return ShapesEditDataset(_shapes(cfg, split, arg), cfg.data, cfg.objective)


def _fashion(cfg: Config, split: str, arg: str) -> Dataset:
    return FashionDataset(root=Path(arg) if arg else FASHION_DIR, split=split, image_size=cfg.data.image_size)


def _emoji(cfg: Config, split: str, arg: str) -> Dataset:
    return EmojiDataset(
        font_path=Path(arg) if arg else EMOJI_FONT, split=split, image_size=cfg.data.image_size
    )


def _manifest(cfg: Config, split: str, arg: str) -> Dataset:
    return ManifestDataset.build(cfg, split, arg)


def _folder(cfg: Config, split: str, arg: str) -> Dataset:
    return FolderDataset.build(cfg, split, arg)


def _speech(cfg: Config, split: str, arg: str) -> Dataset:
    return SpeechDataset.build(cfg, split, arg)


DATASETS["shapes"] = _shapes
DATASETS[EDIT_DATASETS[0]] = _shapes_edit
DATASETS["fashion"] = _fashion
DATASETS["emoji"] = _emoji
DATASETS["manifest"] = _manifest
DATASETS["folder"] = _folder
DATASETS["speech"] = _speech


def build_dataset(cfg: Config, split: str) -> Dataset:
    """The dataset named by `data.dataset`: "NAME" or "NAME:ARG"."""
    name, _, arg = cfg.data.dataset.partition(":")
    if name not in DATASETS:
        raise ConfigError(
            f"data.dataset={cfg.data.dataset!r}: unknown dataset {name!r}; available: {sorted(DATASETS)}"
        )
    return DATASETS[name](cfg, split, arg)


def image_dataset(name: str, image_size: int, split: str, seed: int = 0) -> PairDataset:
    """A registered dataset by name ("NAME" or "NAME:ARG") at `image_size`, for the models trained on
    its (image, caption) samples alone: the VAE, the VQ-VAE, CLIP."""
    cfg = Config(data=DataConfig(dataset=name, image_size=image_size), train=TrainConfig(seed=seed))
    cfg.data.validate()
    dataset = build_dataset(cfg, split)
    if not hasattr(dataset, "sample"):
        raise ConfigError(
            f"dataset={name!r} gives documents, not images; choose an image dataset, e.g. shapes or fashion"
        )
    return dataset


class EpochOrder:
    """Stream index -> dataset index. Infinite datasets: the identity. Finite ones (with `len()`):
    index i is item perm_e[i % n] of epoch e = i // n, perm_e a permutation seeded by (seed, epoch)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.size = len(dataset) if isinstance(dataset, Sized) else None
        if self.size == 0:
            raise ValueError("the dataset is empty")
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __call__(self, index: int) -> int:
        if self.size is None:
            return index
        epoch, pos = divmod(index, self.size)
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, zlib.crc32(b"epochs"), epoch]))
            self._perm = (epoch, rng.permutation(self.size))
        return int(self._perm[1][pos])


class DocumentStream:
    """index -> EncodedDoc, a pure function of (seed, split, index).

    Documents are made in fixed blocks of BLOCK indices, so the image codec (a VAE, a VQ-VAE) encodes
    a block's images as one batch; a block is always the same documents, so a document's encoding
    does not depend on who asks for it or when (ranks, resumed runs). The current block is kept: the
    Packer asks again for the document that did not fit at the end of a row.
    """

    BLOCK = 64

    def __init__(self, dataset: Dataset, tokenizer: Tokenizer, cfg: Config, split: str):
        self.dataset, self.tokenizer, self.cfg, self.split = dataset, tokenizer, cfg, split
        self.seed = split_seed(cfg, split)
        self.order = EpochOrder(dataset, self.seed)
        self._block: tuple[int, list[EncodedDoc]] | None = None
        self.images = image_repr(cfg)  # pixels, a frozen VAE's latents, or VQ codes

    def document(self, index: int) -> Document:
        rng = document_rng(self.seed, self.split, index)
        if isinstance(self.dataset, DocumentDataset):
            return self.dataset.document(self.order(index), rng)
        return document_for(self.dataset.sample(self.order(index)), rng, self.cfg.data, self.cfg.objective)

    def __call__(self, index: int) -> EncodedDoc:
        block, k = divmod(index, self.BLOCK)
        if self._block is None or self._block[0] != block:
            docs = [self.document(i) for i in range(block * self.BLOCK, (block + 1) * self.BLOCK)]
            patch = self.cfg.model.patch_size
            self._block = (
                block,
                [encode_document(d, self.tokenizer, patch) for d in self.images.documents(docs)],
            )
        return self._block[1][k]


def training_texts(cfg: Config, n: int) -> list[str]:
    """The text of the first `n` training documents (captions, or every text segment of a user's
    documents): what a tokenizer trained with the run (data.tokenizer=bpe:N) learns from."""
    dataset, seed = build_dataset(cfg, "train"), split_seed(cfg, "train")
    order = EpochOrder(dataset, seed)
    texts = []
    for i in range(n):
        if isinstance(dataset, DocumentDataset):
            doc = dataset.document(order(i), document_rng(seed, "train", i))
            texts += [seg.text for seg in doc if isinstance(seg, Text)]
        else:
            texts.append(dataset.sample(order(i)).caption)
    return texts


def make_packer(
    cfg: Config, tokenizer: Tokenizer, split: str = "train", rank: int = 0, world_size: int = 1
) -> Packer:
    """Packed batches of `split` for one rank: its (train.batch_size / W, train.seq_len) rows of each global batch.

    train.batch_size is the global batch: rank r takes rows r * B / W to (r + 1) * B / W of the batch
    one process would pack (see Packer), so across ranks every document is used once, in the same
    rows as with one process.
    """
    if cfg.train.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the global batch; it must be divisible "
            f"by the number of processes, {world_size}"
        )
    stream = DocumentStream(build_dataset(cfg, split), tokenizer, cfg, split)
    return Packer(
        stream, cfg.train.batch_size, cfg.train.seq_len, tokenizer.pad, rank=rank, world_size=world_size
    )
