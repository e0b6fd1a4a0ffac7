"""Mixed-modal documents and how they are packed into fixed-length rows.

A document is an ordered list of segments (`Text`, `Image`, `Units`, ...). Encoding turns it into one
flat sequence: BOS, text bytes, BOI, one slot per image patch, EOI, ..., EOS; discrete units (VQ image
codes, speech units) sit between their modality's markers the same way (see ModalitySpec). Packing
places several documents in each row of a (B, T) batch and precomputes, once per batch, every index
the layers need (per-modality positions, image patch positions, loss positions per head), so no
layer syncs with the host.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch

from motfusion.tokenizer import Tokenizer

IGNORE = -100  # target id with no loss

SPAN_END = 0  # local id 0 of a modality whose spans the model closes: "the span ends here"


@dataclass(frozen=True)
class ModalitySpec:
    """How a modality sits in a sequence.

    Text is the frame: every other modality appears as a span between a start and an end marker,
    which are text tokens (tokenizer specials). Inside a span each position holds an id local to
    the modality: a slot for a continuous image (diffusion patches), or an id in the modality's
    own vocabulary, embedded and predicted by its own table and head. Whether a modality is
    discrete in a run is the model's choice (`model.vocab_sizes`: image is continuous unless it
    has a vocabulary there).

    Spans of fixed length (an image: its size fixes the count) are closed by appending the end
    marker. Spans of variable length (speech) are closed by the model: it predicts their end with
    its own head as local id SPAN_END, so their vocabulary shifts the units up by one (`offset`).
    """

    name: str
    index: int  # stored per position in Batch.modality
    start: str | None = None  # tokenizer special that opens a span, e.g. "<boi>"
    end: str | None = None
    model_closes: bool = False

    @property
    def offset(self) -> int:
        """Local id of unit 0: 1 when id 0 is reserved for SPAN_END."""
        return int(self.model_closes)


# Modality registry: name -> spec, and name -> index stored per position.
SPECS: dict[str, ModalitySpec] = {}
MODALITIES: dict[str, int] = {}


def register_modality(
    name: str, start: str | None = None, end: str | None = None, model_closes: bool = False
) -> int:
    """Add a modality (or return the index of one already registered with the same markers)."""
    spec = SPECS.get(name) or ModalitySpec(name, len(SPECS), start, end, model_closes)
    if (spec.start, spec.end, spec.model_closes) != (start, end, model_closes):
        raise ValueError(f"modality {name!r} is already registered as {spec}")
    SPECS[name] = spec
    MODALITIES[name] = spec.index
    return spec.index


TEXT = register_modality("text")
IMAGE = register_modality("image", start="<boi>", end="<eoi>")
SPEECH = register_modality("speech", start="<bosp>", end="<eosp>", model_closes=True)


@dataclass(frozen=True)
class Text:
    text: str
    context: bool = False  # given, not learned (an edit's instruction): no next-token loss on it


@dataclass(frozen=True)
class Image:
    pixels: torch.Tensor  # (C, H, W) in [-1, 1]
    context: bool = False  # given, not learned (an edit's source): clean (never noised), no diffusion loss


@dataclass(frozen=True)
class Units:
    """A span of discrete units of a non-text modality: speech units, or an image's VQ codes.

    `ids` are the units themselves, 0 .. n-1 for a vocabulary of n (`model.vocab_sizes`)."""

    modality: str
    ids: torch.Tensor | list[int]  # (L,)


Segment = Text | Image | Units
Document = list[Segment]


@dataclass
class EncodedDoc:
    """One document as flat per-position lists, ready to be placed in a row."""

    tokens: list[int]
    modality: list[int]
    image_slot: list[int]  # k for the k-th image's patches in this doc, -1 elsewhere
    images: list[torch.Tensor]
    image_first: list[bool]  # the image precedes its caption (gets the noise cap)
    image_clean: list[bool] = field(default_factory=list)  # the image is clean context (Image.context)
    learned: list[bool] = field(default_factory=list)  # per position: may be a next-token target (False:
    # a context Text's tokens)
    caption: int = 0  # a key of the document's text (0: none): equal texts, equal keys

    def __len__(self) -> int:
        return len(self.tokens)


# Segment encoders, keyed by segment type: a new modality registers one instead of editing an if-chain.
SegmentEncoder = Callable[["DocBuilder", Segment], None]
SEGMENT_ENCODERS: dict[type, SegmentEncoder] = {}


class DocBuilder:
    def __init__(self, tokenizer: Tokenizer, patch_size: int):
        self.tok, self.patch_size = tokenizer, patch_size
        self.doc = EncodedDoc([], [], [], [], [])

    def add(self, tokens: list[int], modality: int, slot: int = -1, learned: bool = True) -> None:
        self.doc.tokens += tokens
        self.doc.modality += [modality] * len(tokens)
        self.doc.image_slot += [slot] * len(tokens)
        self.doc.learned += [learned] * len(tokens)


def _encode_text(b: DocBuilder, seg: Text) -> None:
    b.add(b.tok.encode(seg.text), TEXT, learned=not seg.context)


def _encode_image(b: DocBuilder, seg: Image) -> None:
    c, h, w = seg.pixels.shape
    k = b.patch_size
    if h % k or w % k:
        raise ValueError(f"image of size {h}x{w} is not divisible by model.patch_size={k}")
    b.add([b.tok.boi], TEXT)
    b.add([b.tok.pad] * (h // k) * (w // k), IMAGE, slot=len(b.doc.images))
    b.add([b.tok.eoi], TEXT)
    b.doc.images.append(seg.pixels)


def _encode_units(b: DocBuilder, seg: Units) -> None:
    spec = SPECS.get(seg.modality)
    if spec is None or spec.start is None:
        spans = sorted(name for name, s in SPECS.items() if s.start is not None)
        raise ValueError(f"Units of modality {seg.modality!r}: not a span modality; registered: {spans}")
    ids = torch.as_tensor(seg.ids).flatten().tolist()
    if not ids or min(ids) < 0:
        raise ValueError(f"Units of {seg.modality!r} need at least one id, all >= 0")
    b.add([b.tok.special_ids[spec.start]], TEXT)
    b.add([i + spec.offset for i in ids], spec.index)
    b.add([b.tok.special_ids[spec.end]], TEXT)


SEGMENT_ENCODERS[Text] = _encode_text
SEGMENT_ENCODERS[Image] = _encode_image
SEGMENT_ENCODERS[Units] = _encode_units


def encode_document(doc: Document, tokenizer: Tokenizer, patch_size: int, close: bool = True) -> EncodedDoc:
    """`close=False` leaves out the EOS: a prompt that generation continues."""
    if not doc and close:
        raise ValueError("empty document: it needs at least one segment")
    b = DocBuilder(tokenizer, patch_size)
    b.add([tokenizer.bos], TEXT)
    for seg in doc:
        if type(seg) not in SEGMENT_ENCODERS:
            raise ValueError(
                f"unknown segment type {type(seg).__name__}; known: {[t.__name__ for t in SEGMENT_ENCODERS]}"
            )
        SEGMENT_ENCODERS[type(seg)](b, seg)
    if close:
        b.add([tokenizer.eos], TEXT)
    # An image gets the noise cap when it comes before any text and text follows it (it conditions a
    # caption). An image alone, e.g. with its caption dropped for classifier-free guidance, does not.
    is_text = [isinstance(seg, Text) for seg in doc]
    b.doc.image_first = [
        not any(is_text[:i]) and any(is_text[i + 1 :]) for i, seg in enumerate(doc) if isinstance(seg, Image)
    ]
    b.doc.image_clean = [seg.context for seg in doc if isinstance(seg, Image)]
    b.doc.caption = caption_key(" ".join(seg.text for seg in doc if isinstance(seg, Text)))
    return b.doc


def caption_key(text: str) -> int:
    """A stable 62-bit key of a text (0 for none): the contrastive loss treats images with equal
    captions as matches rather than as negatives of each other."""
    if not text:
        return 0
    return 1 + int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % (2**62)


class ImageGroup(NamedTuple):
    """Images of one size in a batch: rows start .. start + count - 1 of `Batch.images`."""

    start: int
    count: int
    height: int
    width: int
    patches: int  # positions per image


@dataclass
class Batch:
    """A packed (B, T) batch. Per-position tensors are (B, T); flat indices address B * T."""

    tokens: torch.Tensor  # (B, T) ids local to each position's modality vocabulary; PAD at image patches
    modality: torch.Tensor  # (B, T) input modality per position
    doc: torch.Tensor  # (B, T) document id within the row, -1 for padding
    pos: torch.Tensor  # (B, T) RoPE position within the document
    image: torch.Tensor  # (B, T) image index into `images`, -1 elsewhere
    targets: torch.Tensor  # (B, T) next id, in the vocabulary of the head that predicts it; IGNORE: no loss
    # Images of different sizes are grouped by size (see `groups`): then `images` is zero-padded to the
    # largest height and width and `image_index` to the most patches; read them through `groups`.
    images: torch.Tensor  # (N, C, H, W) clean images
    image_index: torch.Tensor  # (N, L) flat positions of each image's patches, raster order
    image_first: torch.Tensor  # (N,) bool: image precedes its caption
    image_clean: torch.Tensor  # (N,) bool: clean context, neither noised nor scored (an edit's source)
    image_caption: torch.Tensor  # (N,) int64: caption_key of each image's document (0: no text)
    image_order: torch.Tensor  # (N,) each image's index in document order, before grouping by size
    modality_index: dict[str, torch.Tensor]  # name -> flat positions of that input modality
    loss_index: dict[str, torch.Tensor]  # name -> flat positions whose target that modality's head predicts
    image_groups: tuple[ImageGroup, ...] = ()  # host metadata: one group per image size, in order

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    def groups(self) -> Iterator[tuple[slice, int, int, torch.Tensor]]:
        """Per image size: the rows of `images` it holds, height, width, and its (n, L) image_index."""
        for g in self.image_groups:
            rows = slice(g.start, g.start + g.count)
            yield rows, g.height, g.width, self.image_index[rows, : g.patches]

    @property
    def text_loss_index(self) -> torch.Tensor:
        return self.loss_index["text"]

    def to(self, device: torch.device | str) -> Batch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):
                moved[f.name] = {k: t.to(device, non_blocking=True) for k, t in v.items()}
            else:
                moved[f.name] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
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
    target_modality = torch.full((B, T), -1, dtype=torch.long)
    images, image_first, image_index, image_caption, image_clean = [], [], [], [], []
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
            targets[b, sl], target_modality[b, sl] = _lm_targets(enc)
            for k, pixels in enumerate(enc.images):
                image_index.append(b * T + start + (slot == k).nonzero().squeeze(1))
                images.append(pixels)
            image_first += enc.image_first
            image_clean += enc.image_clean
            image_caption += [enc.caption] * len(enc.images)
            start += n
    # Images of one size become contiguous: the model and the loss run each size as one tensor.
    shapes = [tuple(x.shape) for x in images]
    order = sorted(
        range(len(images)), key=lambda i: shapes.index(shapes[i])
    )  # stable, first-seen sizes first
    renumber = torch.empty(len(images) + 1, dtype=torch.long)
    renumber[torch.tensor(order, dtype=torch.long)] = torch.arange(len(images))
    renumber[-1] = -1
    image = renumber[image]  # -1 stays -1
    images, image_index = [images[i] for i in order], [image_index[i] for i in order]
    image_first, image_caption = [image_first[i] for i in order], [image_caption[i] for i in order]
    image_clean = [image_clean[i] for i in order]
    flat_modality, flat_target = modality.view(-1), target_modality.view(-1)
    return Batch(
        tokens=tokens,
        modality=modality,
        doc=doc_id,
        pos=pos,
        image=image,
        targets=targets,
        images=_stack_padded(images),
        image_index=_stack_padded(image_index) if image_index else torch.zeros(0, 1, dtype=torch.long),
        image_first=torch.tensor(image_first, dtype=torch.bool),
        image_clean=torch.tensor(image_clean, dtype=torch.bool),
        image_caption=torch.tensor(image_caption, dtype=torch.long),
        image_order=torch.tensor(order, dtype=torch.long),
        image_groups=_image_groups(images, image_index),
        modality_index={name: (flat_modality == i).nonzero().squeeze(1) for name, i in MODALITIES.items()},
        loss_index={name: (flat_target == i).nonzero().squeeze(1) for name, i in MODALITIES.items()},
    )


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack, zero-padding every trailing dim to the largest (only where sizes differ)."""
    if not tensors:
        return torch.zeros(0, 3, 1, 1)
    if len({tuple(x.shape) for x in tensors}) == 1:
        return torch.stack(tensors)
    if len({x.shape[0] for x in tensors}) > 1 and tensors[0].dim() == 3:
        raise ValueError(
            f"images in one batch must have the same channels, got {sorted({x.shape[0] for x in tensors})}"
        )
    shape = [max(x.shape[d] for x in tensors) for d in range(tensors[0].dim())]
    out = tensors[0].new_zeros(len(tensors), *shape)
    for i, x in enumerate(tensors):
        out[(i, *(slice(0, n) for n in x.shape))] = x
    return out


def _image_groups(images: list[torch.Tensor], image_index: list[torch.Tensor]) -> tuple[ImageGroup, ...]:
    """Runs of equal-size images (already contiguous)."""
    groups: list[ImageGroup] = []
    for i, (x, idx) in enumerate(zip(images, image_index)):
        if groups and (groups[-1].height, groups[-1].width) == tuple(x.shape[1:]):
            groups[-1] = groups[-1]._replace(count=groups[-1].count + 1)
        else:
            groups.append(ImageGroup(i, 1, x.shape[1], x.shape[2], idx.numel()))
    return tuple(groups)


def _lm_targets(enc: EncodedDoc) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets, and the modality whose head predicts each (-1 where there is no loss).

    Position i predicts position i + 1 with the head of i + 1's modality, except that
    - continuous positions (diffusion patches) neither predict nor are predicted: no loss on BOI;
    - the end marker after a span's last element is appended, not predicted (an image's EOI), unless
      the model closes that modality's spans: then the span's own head predicts SPAN_END there.
    """
    tok, mod, slot = (torch.tensor(x) for x in (enc.tokens, enc.modality, enc.image_slot))
    learned = torch.tensor(enc.learned, dtype=torch.bool)
    continuous = slot >= 0
    closes = (mod[:-1] != TEXT) & (mod[1:] == TEXT)  # i ends a span; i + 1 is its end marker
    model_closes = torch.tensor([spec.model_closes for spec in SPECS.values()])[mod[:-1]]
    keep = ~continuous[:-1] & ~continuous[1:] & (~closes | model_closes) & learned[1:]
    targets, heads = torch.full_like(tok, IGNORE), torch.full_like(tok, -1)
    targets[:-1] = torch.where(keep, torch.where(closes, SPAN_END, tok[1:]), IGNORE)
    heads[:-1] = torch.where(keep, torch.where(closes, mod[:-1], mod[1:]), -1)
    return targets, heads


class Packer:
    """Greedy packing of a deterministic document stream into (B, T) batches.

    `doc_fn(i)` returns the i-th encoded document. The state is the index of the first document not
    yet placed, so resuming from `state_dict()` reproduces the same batches exactly.

    With several ranks, `batch_size` is the global batch: every rank packs the same global rows and
    collates only its own contiguous `batch_size / world_size` of them. So W ranks together train on
    exactly the batches of one process, and the state is the same on every rank: a checkpoint
    resumes with any number of ranks. The price: every rank builds all the documents of the global
    batch, since greedy packing needs their lengths (collating, the larger part, is per rank).
    """

    def __init__(
        self,
        doc_fn: Callable[[int], EncodedDoc],
        batch_size: int,
        seq_len: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(f"a global batch of {batch_size} rows does not split over {world_size} ranks")
        self.doc_fn, self.batch_size, self.seq_len, self.pad_id = doc_fn, batch_size, seq_len, pad_id
        self.rank, self.world_size = rank, world_size
        self.next_doc = 0

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> Batch:
        """This rank's (batch_size / world_size, seq_len) rows of the next global batch."""
        rows = [self._next_row() for _ in range(self.batch_size)]
        per_rank = self.batch_size // self.world_size
        return collate(rows[self.rank * per_rank : (self.rank + 1) * per_rank], self.seq_len, self.pad_id)

    def _next_row(self) -> list[EncodedDoc]:
        row, used = [], 0
        while True:
            enc = self.doc_fn(self.next_doc)
            if len(enc) > self.seq_len:
                raise ValueError(
                    f"document {self.next_doc} has {len(enc)} positions, more than "
                    f"train.seq_len={self.seq_len}; raise train.seq_len"
                )
            if used + len(enc) > self.seq_len:
                return row
            row.append(enc)
            used += len(enc)
            self.next_doc += 1

    def state_dict(self) -> dict[str, int]:
        return {"next_doc": self.next_doc}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next_doc = int(state["next_doc"])


class Prefetcher:
    """A Packer that builds the next batch in a background thread while the current one trains.

    The step's kernels release the GIL, so drawing, rendering and packing documents (numpy and
    Python, about 20% of the demo recipe's CPU step) can overlap with them; on 2 CPU cores, which the
    step's own threads mostly fill, it gained about 4% (docs/RESULTS.md). The batches and their
    order are the Packer's own; `state_dict()` is the state after the last batch handed out, not
    after the one being built, so a checkpoint resumes exactly where training was.
    """

    def __init__(self, packer: Packer):
        self.packer = packer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="motfusion-batches")
        self._pending: Future[tuple[Batch, dict[str, int]]] | None = None
        self._state = packer.state_dict()

    def _build(self) -> tuple[Batch, dict[str, int]]:
        batch = self.packer.next_batch()
        return batch, self.packer.state_dict()

    def next_batch(self) -> Batch:
        pending, self._pending = self._pending or self._pool.submit(self._build), None
        batch, self._state = pending.result()  # a document error raises here, for the batch asked for
        self._pending = self._pool.submit(self._build)
        return batch

    def state_dict(self) -> dict[str, int]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self._pending is not None:
            self._pending.cancel() or self._pending.exception()  # wait for a started build; drop it
            self._pending = None
        self.packer.load_state_dict(state)
        self._state = self.packer.state_dict()


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
