"""Mixed-modal documents and how they are packed into fixed-length rows.

A document is an ordered list of segments (`Text`, `Image`, ...). Encoding turns it into one flat
sequence: BOS, text bytes, BOI, one slot per image patch, EOI, ..., EOS. Packing places several
documents in each row of a (B, T) batch and precomputes, once per batch, every index the layers need
(per-modality positions, image patch positions, loss positions), so no layer syncs with the host.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Iterator

import torch

from motfusion.tokenizer import Tokenizer

IGNORE = -100  # target id with no loss

# Modality registry: name -> index stored per position. Discrete modalities have a token head.
MODALITIES: dict[str, int] = {}


def register_modality(name: str) -> int:
    return MODALITIES.setdefault(name, len(MODALITIES))


TEXT = register_modality("text")
IMAGE = register_modality("image")


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Image:
    pixels: torch.Tensor  # (C, H, W) in [-1, 1]


Segment = Text | Image
Document = list[Segment]


@dataclass
class EncodedDoc:
    """One document as flat per-position lists, ready to be placed in a row."""

    tokens: list[int]
    modality: list[int]
    image_slot: list[int]  # k for the k-th image's patches in this doc, -1 elsewhere
    images: list[torch.Tensor]
    image_first: list[bool]  # the image precedes its caption (gets the noise cap)

    def __len__(self) -> int:
        return len(self.tokens)


# Segment encoders, keyed by segment type: a new modality registers one instead of editing an if-chain.
SegmentEncoder = Callable[["DocBuilder", Segment], None]
SEGMENT_ENCODERS: dict[type, SegmentEncoder] = {}


class DocBuilder:
    def __init__(self, tokenizer: Tokenizer, patch_size: int):
        self.tok, self.patch_size = tokenizer, patch_size
        self.doc = EncodedDoc([], [], [], [], [])

    def add(self, tokens: list[int], modality: int, slot: int = -1) -> None:
        self.doc.tokens += tokens
        self.doc.modality += [modality] * len(tokens)
        self.doc.image_slot += [slot] * len(tokens)


def _encode_text(b: DocBuilder, seg: Text) -> None:
    b.add(b.tok.encode(seg.text), TEXT)


def _encode_image(b: DocBuilder, seg: Image) -> None:
    c, h, w = seg.pixels.shape
    k = b.patch_size
    if h % k or w % k:
        raise ValueError(f"image of size {h}x{w} is not divisible by model.patch_size={k}")
    b.add([b.tok.boi], TEXT)
    b.add([b.tok.pad] * (h // k) * (w // k), IMAGE, slot=len(b.doc.images))
    b.add([b.tok.eoi], TEXT)
    b.doc.images.append(seg.pixels)


SEGMENT_ENCODERS[Text] = _encode_text
SEGMENT_ENCODERS[Image] = _encode_image


def encode_document(doc: Document, tokenizer: Tokenizer, patch_size: int, close: bool = True) -> EncodedDoc:
    """`close=False` leaves out the EOS: a prompt that generation continues."""
    if not doc and close:
        raise ValueError("empty document: it needs at least one segment")
    b = DocBuilder(tokenizer, patch_size)
    b.add([tokenizer.bos], TEXT)
    for seg in doc:
        if type(seg) not in SEGMENT_ENCODERS:
            raise ValueError(f"unknown segment type {type(seg).__name__}; known: {[t.__name__ for t in SEGMENT_ENCODERS]}")
        SEGMENT_ENCODERS[type(seg)](b, seg)
    if close:
        b.add([tokenizer.eos], TEXT)
    # An image gets the noise cap when it comes before any text and text follows it (it conditions a
    # caption). An image alone, e.g. with its caption dropped for classifier-free guidance, does not.
    is_text = [isinstance(seg, Text) for seg in doc]
    b.doc.image_first = [not any(is_text[:i]) and any(is_text[i + 1:]) for i, seg in enumerate(doc) if isinstance(seg, Image)]
    return b.doc


@dataclass
class Batch:
    """A packed (B, T) batch. Per-position tensors are (B, T); flat indices address B * T."""

    tokens: torch.Tensor  # (B, T) text token ids, PAD at image positions
    modality: torch.Tensor  # (B, T) input modality per position
    doc: torch.Tensor  # (B, T) document id within the row, -1 for padding
    pos: torch.Tensor  # (B, T) RoPE position within the document
    image: torch.Tensor  # (B, T) image index into `images`, -1 elsewhere
    targets: torch.Tensor  # (B, T) next text token, IGNORE where no LM loss
    images: torch.Tensor  # (N, C, H, W) clean images
    image_index: torch.Tensor  # (N, L) flat positions of each image's patches, raster order
    image_first: torch.Tensor  # (N,) bool: image precedes its caption
    modality_index: dict[str, torch.Tensor]  # name -> flat positions of that input modality
    text_loss_index: torch.Tensor  # flat positions with an LM target

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    def to(self, device: torch.device | str) -> "Batch":
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = {k: t.to(device, non_blocking=True) for k, t in v.items()} if isinstance(v, dict) else v.to(device, non_blocking=True)
        return Batch(**moved)


def collate(rows: list[list[EncodedDoc]], seq_len: int, pad_id: int) -> Batch:
    """Place documents row by row (each row's docs must fit in seq_len) and build every index."""
    B, T = len(rows), seq_len
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    modality = torch.full((B, T), TEXT, dtype=torch.long)
    doc_id = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    image = torch.full((B, T), -1, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    images, image_first, image_index = [], [], []
    for b, docs in enumerate(rows):
        start = 0
        for d, enc in enumerate(docs):
            n = len(enc)
            if start + n > T:
                raise ValueError(f"documents of {start + n} positions do not fit in train.seq_len={T}")
            sl = slice(start, start + n)
            tokens[b, sl] = torch.tensor(enc.tokens)
            modality[b, sl] = torch.tensor(enc.modality)
            doc_id[b, sl] = d
            pos[b, sl] = torch.arange(n)
            slot = torch.tensor(enc.image_slot)
            image[b, sl] = torch.where(slot >= 0, slot + len(images), -1)
            targets[b, sl] = _lm_targets(enc)
            for k, pixels in enumerate(enc.images):
                image_index.append(b * T + start + (slot == k).nonzero().squeeze(1))
                images.append(pixels)
            image_first += enc.image_first
            start += n
    if len({tuple(x.shape) for x in images}) > 1:
        raise ValueError(f"images in one batch must share a size, got {sorted({tuple(x.shape) for x in images})}")
    flat_modality = modality.view(-1)
    return Batch(
        tokens=tokens, modality=modality, doc=doc_id, pos=pos, image=image, targets=targets,
        images=torch.stack(images) if images else torch.zeros(0, 3, 1, 1),
        image_index=torch.stack(image_index) if image_index else torch.zeros(0, 1, dtype=torch.long),
        image_first=torch.tensor(image_first, dtype=torch.bool),
        modality_index={name: (flat_modality == i).nonzero().squeeze(1) for name, i in MODALITIES.items()},
        text_loss_index=(targets.view(-1) != IGNORE).nonzero().squeeze(1),
    )


def _lm_targets(enc: EncodedDoc) -> torch.Tensor:
    """Next-token targets: only where the next position is text, and never the EOI after an image."""
    tok = torch.tensor(enc.tokens)
    mod = torch.tensor(enc.modality)
    out = torch.full_like(tok, IGNORE)
    nxt_text = mod[1:] == TEXT
    nxt_after_image = mod[:-1] == IMAGE  # the next token is the EOI that closes an image: appended, not predicted
    keep = nxt_text & ~nxt_after_image
    out[:-1] = torch.where(keep, tok[1:], IGNORE)
    return out


class Packer:
    """Greedy packing of a deterministic document stream into (B, T) batches.

    `doc_fn(i)` returns the i-th encoded document. The state is the index of the first document not
    yet placed, so resuming from `state_dict()` reproduces the same batches exactly.
    """

    def __init__(self, doc_fn: Callable[[int], EncodedDoc], batch_size: int, seq_len: int, pad_id: int,
                 start: int = 0, stride: int = 1):
        self.doc_fn, self.batch_size, self.seq_len, self.pad_id = doc_fn, batch_size, seq_len, pad_id
        self.next_doc, self.stride = start, stride

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> Batch:
        rows = []
        for _ in range(self.batch_size):
            row, used = [], 0
            while True:
                enc = self.doc_fn(self.next_doc)
                if len(enc) > self.seq_len:
                    raise ValueError(f"document {self.next_doc} has {len(enc)} positions, more than "
                                     f"train.seq_len={self.seq_len}; raise train.seq_len")
                if used + len(enc) > self.seq_len:
                    break
                row.append(enc)
                used += len(enc)
                self.next_doc += self.stride
            rows.append(row)
        return collate(rows, self.seq_len, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"next_doc": self.next_doc}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next_doc = int(state["next_doc"])


def pack_documents(docs: list[Document], tokenizer: Tokenizer, patch_size: int, seq_len: int) -> Batch:
    """Encode documents and pack them greedily, in order, into as many rows of seq_len as needed."""
    rows: list[list[EncodedDoc]] = [[]]
    used = 0
    for doc in docs:
        enc = encode_document(doc, tokenizer, patch_size)
        if used + len(enc) > seq_len and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append(enc)
        used += len(enc)
    return collate(rows, seq_len, tokenizer.pad)
