"""The Transfusion attention pattern and its two backends.

A query may attend to a key when both are in the same document AND (the key is not in the future OR
both are patches of the same image). With `image_attention="causal"` the second clause is dropped
(the paper's ablation). Padding has document id -1: it only ever sees other padding, so no row is
empty and real tokens never see it.

Backends: `sdpa` uses a dense boolean mask (runs everywhere, with backward on CPU); `flex` builds a
BlockMask from the same predicate (fast on CUDA; forward only on CPU in torch 2.13).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import (
    BlockMask,
    create_block_mask,
    flex_attention,
)


@dataclass
class SeqMeta:
    """What the mask needs per position: (B, T) document id, image id and absolute index."""

    doc: torch.Tensor
    image: torch.Tensor
    index: torch.Tensor

    def cat(self, other: "SeqMeta") -> "SeqMeta":
        return SeqMeta(*(torch.cat((a, b), dim=1) for a, b in
                         ((self.doc, other.doc), (self.image, other.image), (self.index, other.index))))


def allowed(q_doc, q_img, q_idx, k_doc, k_img, k_idx, bidirectional: bool) -> torch.Tensor:
    """The mask predicate on broadcastable tensors; shared by the dense mask and flex's mask_mod."""
    visible = k_idx <= q_idx
    if bidirectional:
        visible = visible | ((q_img == k_img) & (q_img >= 0))
    return (q_doc == k_doc) & visible


def dense_mask(q: SeqMeta, k: SeqMeta, bidirectional: bool) -> torch.Tensor:
    """(B, 1, Tq, Tk) boolean mask, True = may attend."""
    m = allowed(q.doc[:, :, None], q.image[:, :, None], q.index[:, :, None],
                k.doc[:, None, :], k.image[:, None, :], k.index[:, None, :], bidirectional)
    return m[:, None]


def flex_block_mask(meta: SeqMeta, bidirectional: bool) -> BlockMask:
    doc, img, idx = meta.doc, meta.image, meta.index

    def mask_mod(b, h, q, k):
        return allowed(doc[b, q], img[b, q], idx[b, q], doc[b, k], img[b, k], idx[b, k], bidirectional)

    B, T = doc.shape
    return create_block_mask(mask_mod, B, None, T, T, device=doc.device)


_compiled_flex = None


def _flex(q, k, v, block_mask):
    """flex_attention, compiled on CUDA (fused kernel); eager elsewhere (reference implementation)."""
    global _compiled_flex
    if q.device.type != "cuda":
        if torch.is_grad_enabled() and q.requires_grad:
            raise ValueError("model.attention_backend=flex has no backward on CPU in torch 2.13: "
                             "train with model.attention_backend=sdpa (the CPU default)")
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
    return dense_mask(q, k, bidirectional)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
    """q: (B, H, Tq, hd); k, v: (B, H, Tk, hd); mask: dense bool or BlockMask -> (B, H, Tq, hd)."""
    if isinstance(mask, BlockMask):
        return _flex(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return name
