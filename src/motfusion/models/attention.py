"""The Transfusion attention pattern and its backends.

A query may attend to a key when both are in the same document AND (the key is not in the future OR
both are patches of the same image). With `image_attention="causal"` the second clause is dropped
(the paper's ablation). Padding has document id -1: it only ever sees other padding, so no row is
empty and real tokens never see it.

Backends, all exact to the same predicate:
- `sdpa`: a dense (B, 1, T, T) boolean mask; runs everywhere, and is the reference.
- `documents` (auto on CPU): attention that follows the documents, not the row. Each document (a
  run of one document id in a row; a row's padding is one too) becomes a row of a bucket of
  documents of about its length, and sdpa runs per bucket, so a pass costs the sum of its
  documents' L^2 rather than B * T^2. Full passes only; it falls back to `sdpa` when the buckets
  would not save at least half (one long document per row).
- `flex` (auto on CUDA): a BlockMask from the same predicate, whose kernel skips the fully masked
  blocks (fast on CUDA; forward only on CPU in torch 2.13).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import (
    BlockMask,
    create_block_mask,
    flex_attention,
)

from motfusion.models.layers import gather_rows


@dataclass
class SeqMeta:
    """What the mask needs per position: (B, T) document id, image id and absolute index."""

    doc: torch.Tensor
    image: torch.Tensor
    index: torch.Tensor

    def cat(self, other: SeqMeta) -> SeqMeta:
        return SeqMeta(
            *(
                torch.cat((a, b), dim=1)
                for a, b in ((self.doc, other.doc), (self.image, other.image), (self.index, other.index))
            )
        )


def allowed(q_doc, q_img, q_idx, k_doc, k_img, k_idx, bidirectional: bool) -> torch.Tensor:
    """The mask predicate on broadcastable tensors; shared by the dense mask and flex's mask_mod."""
    visible = k_idx <= q_idx
    if bidirectional:
        visible = visible | ((q_img == k_img) & (q_img >= 0))
    return (q_doc == k_doc) & visible


def dense_mask(q: SeqMeta, k: SeqMeta, bidirectional: bool) -> torch.Tensor:
    """(B, 1, Tq, Tk) boolean mask, True = may attend."""
    m = allowed(
        q.doc[:, :, None],
        q.image[:, :, None],
        q.index[:, :, None],
        k.doc[:, None, :],
        k.image[:, None, :],
        k.index[:, None, :],
        bidirectional,
    )
    return m[:, None]


def flex_block_mask(meta: SeqMeta, bidirectional: bool) -> BlockMask:
    doc, img, idx = meta.doc, meta.image, meta.index

    def mask_mod(b, h, q, k):
        return allowed(doc[b, q], img[b, q], idx[b, q], doc[b, k], img[b, k], idx[b, k], bidirectional)

    B, T = doc.shape
    return create_block_mask(mask_mod, B, None, T, T, device=doc.device)


@dataclass(frozen=True)
class DocumentBuckets:
    """Where each position sits for document-bucketed attention (built once per pass).

    The N = B * T positions are read in some order (row order; the MoT backbone's tower order after
    `reorder`). Slots: the buckets' rows of `length` slots each, concatenated; a document fills the
    start of its row, the rest are padding slots that repeat its first position and attend to
    padding only (document id -2), so nothing real reads them."""

    src: torch.Tensor  # (S,) the position each slot reads (padding: its document's first)
    dst: torch.Tensor  # (N,) the slot of each position
    sizes: tuple[tuple[int, int], ...]  # (rows, length) of each bucket, in slot order
    masks: tuple[
        torch.Tensor, ...
    ]  # (rows, 1, length, length) per bucket, additive: 0 or -inf (sdpa converts a bool one per call)
    identity: bool = (
        False  # the slots are the positions (documents of one bucket length, in order): no gathers
    )

    def reorder(self, order: torch.Tensor, inverse: torch.Tensor) -> DocumentBuckets:
        """For positions read in a new order: new position i is old position order[i]."""
        return replace(self, src=inverse[self.src], dst=self.dst[order], identity=False)

    @torch.compiler.disable  # a loop over buckets whose count and sizes change with every batch
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (N, H, hd) -> (N, H, hd), positions in this object's order. Not compiled:
        traced, the bucket layout would recompile the graph for every new batch; eager, each
        bucket is one sdpa kernel anyway."""
        H, hd = q.shape[1:]
        if not self.identity:
            q, k, v = (gather_rows(t, self.src, self.dst) for t in (q, k, v))  # (S, H, hd) each
        buckets = (
            zip(*(t.split([n * L for n, L in self.sizes]) for t in (q, k, v)))
            if len(self.sizes) > 1
            else [(q, k, v)]
        )
        ys = []
        for (n, L), mask, qkv in zip(self.sizes, self.masks, buckets):
            qb, kb, vb = (t.view(n, L, H, hd).transpose(1, 2) for t in qkv)  # (n, H, L, hd)
            y = sdpa(qb, kb, vb, mask)  # (n, H, L, hd)
            ys.append(y.transpose(1, 2).reshape(n * L, H, hd))
        y = torch.cat(ys) if len(ys) > 1 else ys[0]  # (S, H, hd)
        return y if self.identity else gather_rows(y, self.dst, self.src)  # (N, H, hd)


def bucket_length(n: torch.Tensor) -> torch.Tensor:
    """Round lengths up in quarter steps of their power of two (..., 64, 80, 96, 112, 128, 160, ...),
    in steps of at least 4: padding costs less than a quarter of a document of 16 or more."""
    step = (2 ** torch.floor(torch.log2((n - 1).clamp(min=1).double())).long() // 4).clamp(min=4)  # (R,)
    return (n + step - 1) // step * step


def document_buckets(meta: SeqMeta, bidirectional: bool, min_saving: float = 0.5) -> DocumentBuckets | None:
    """Buckets of the documents in (B, T) `meta`, or None when they would cost more than
    `min_saving` of dense attention (sum of length^2 over slot rows vs B * T^2). Host-side, once."""
    B, T = meta.doc.shape
    doc = meta.doc.flatten()  # (N,)
    N = doc.numel()
    pos = torch.arange(N, device=doc.device)
    starts = torch.ones(N, dtype=torch.bool, device=doc.device)
    starts[1:] = doc[1:] != doc[:-1]
    starts[::T] = True  # a document never spans two rows
    first = pos[starts]  # (R,) first position of each run
    length = torch.diff(first, append=first.new_tensor([N]))  # (R,)
    padded = bucket_length(length)  # (R,)
    if (padded**2).sum() > min_saving * B * T * T:
        return None
    run = starts.long().cumsum(0) - 1  # (N,) the run of each position
    base = torch.empty_like(first)  # (R,) the slot of each run's first position
    src, sizes, masks, offset = [], [], [], 0
    for L in padded.unique().tolist():
        runs = (padded == L).nonzero().squeeze(1)  # (n,)
        n = runs.numel()
        base[runs] = offset + torch.arange(n, device=doc.device) * L
        slots = torch.arange(L, device=doc.device)
        valid = slots < length[runs, None]  # (n, L)
        read = torch.where(valid, first[runs, None] + slots, first[runs, None])  # (n, L)
        visible = dense_mask(*(bucket_meta(meta, read, valid),) * 2, bidirectional)  # (n, 1, L, L)
        masks.append(torch.zeros(visible.shape, device=doc.device).masked_fill_(~visible, float("-inf")))
        src.append(read.flatten())
        sizes.append((n, L))
        offset += n * L
    dst = base[run] + pos - first[run]  # (N,)
    src = torch.cat(src)
    identity = src.numel() == N and torch.equal(src, pos)
    return DocumentBuckets(src, dst, tuple(sizes), tuple(masks), identity)


def bucket_meta(meta: SeqMeta, read: torch.Tensor, valid: torch.Tensor) -> SeqMeta:
    """(n, L) metadata of a bucket's slots; padding slots are document -2, so they see padding only."""
    doc, image, index = (t.flatten()[read] for t in (meta.doc, meta.image, meta.index))
    return SeqMeta(doc.masked_fill(~valid, -2), image.masked_fill(~valid, -1), index)


_compiled_flex = None


def _flex(q, k, v, block_mask):
    """flex_attention, compiled on CUDA (fused kernel); eager elsewhere (reference implementation)."""
    global _compiled_flex
    if q.device.type != "cuda":
        if torch.is_grad_enabled() and q.requires_grad:
            raise ValueError(
                "model.attention_backend=flex has no backward on CPU in torch 2.13: "
                "train with model.attention_backend=sdpa, or auto (documents on CPU)"
            )
        with warnings.catch_warnings():  # eager flex warns that it is unfused; on CPU that is expected
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def build_mask(backend: str, q: SeqMeta, k: SeqMeta, bidirectional: bool) -> Any:
    """The mask for a forward pass, built once and shared by every layer."""
    if backend == "flex":
        if q.doc.shape != k.doc.shape:
            raise ValueError("the flex backend is for full-sequence passes; cached decoding uses sdpa")
        return flex_block_mask(q, bidirectional)
    if backend == "documents":
        if q is not k:
            raise ValueError("the documents backend is for full-sequence passes; cached decoding uses sdpa")
        buckets = document_buckets(q, bidirectional)
        if buckets is not None:
            return buckets
    return dense_mask(q, k, bidirectional)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
    """q: (B, H, Tq, hd); k, v: (B, H, Tk, hd); mask: dense bool or BlockMask -> (B, H, Tq, hd).
    (DocumentBuckets take the positions flat: see `DocumentBuckets.attend`.)"""
    if isinstance(mask, BlockMask):
        return _flex(q, k, v, mask)
    return sdpa(q, k, v, mask)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention with a bool or additive float mask; on CPU always in fp32, even
    under bf16 autocast (train.precision=bf16), returning q's dtype. torch 2.13's CPU flash attention
    is about ten times slower backward in bf16 than in fp32 (demo step, torch profiler), and attention
    is a small share of the FLOPs; the matmuls and convolutions around it keep bf16's speed."""
    upcast = q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if mask.is_floating_point():
        mask = mask.to(torch.float32 if upcast else q.dtype)
    if not upcast:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)


def resolve_backend(name: str, device: torch.device) -> str:
    """auto: flex on CUDA, documents elsewhere."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "documents"
    return name
