"""Document-bucketed attention (the `documents` backend) equals the dense-mask reference, forward
and backward, in row order and in any reordering of the positions."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch

from motfusion.models.attention import (
    DocumentBuckets,
    SeqMeta,
    bucket_length,
    build_mask,
    dense_mask,
    document_buckets,
)
from motfusion.sequence import Image, Text, collate, encode_document

H, HD = 2, 8


def meta_of(batch) -> SeqMeta:
    B, T = batch.shape
    return SeqMeta(batch.doc, batch.image, torch.arange(T).expand(B, T))


def dense_reference(q, k, v, meta, bidirectional):
    """q, k, v: (N, H, hd) in row order -> (N, H, hd) through sdpa with the (B, 1, T, T) mask."""
    B, T = meta.doc.shape
    rows = [t.view(B, T, H, HD).transpose(1, 2) for t in (q, k, v)]  # (B, H, T, hd)
    y = F.scaled_dot_product_attention(*rows, attn_mask=dense_mask(meta, meta, bidirectional))
    return y.transpose(1, 2).reshape(B * T, H, HD)


def grads_of(fn, *inputs, order=None):
    """fn's output and the gradients of a fixed random projection of it (whose rows follow `order`)."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    out.backward(upstream if order is None else upstream[order])
    return out.detach(), [x.grad for x in inputs]


def qkv(n: int, seed: int = 0):
    return torch.randn(3, n, H, HD, generator=torch.Generator().manual_seed(seed)).unbind(0)


def many_short_documents(tok, rows=2, docs=6):
    """Rows of short text+image documents (and some padding): the case buckets exist for."""
    enc = [
        encode_document([Text("ab" * (i % 3)), Image(torch.rand(3, 8, 8)), Text("c")], tok, 4)
        for i in range(docs)
    ]
    return collate([enc] * rows, sum(map(len, enc)) + 5, tok.pad)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_buckets_equal_dense_mask_forward_and_backward(tok, seed, bidirectional):
    b = random_batch(tok, seed=seed, rows=3, seq_len=160)
    meta = meta_of(b)
    buckets = document_buckets(meta, bidirectional, min_saving=1.0)
    assert buckets is not None
    q, k, v = qkv(b.doc.numel(), seed)
    ref, ref_grads = grads_of(lambda *t: dense_reference(*t, meta, bidirectional), q, k, v)
    out, out_grads = grads_of(buckets.attend, q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(out_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_reordered_buckets_read_positions_in_the_new_order(tok):
    """The MoT backbone hands attention its positions in tower order: same result, permuted."""
    b = many_short_documents(tok)
    meta = meta_of(b)
    buckets = document_buckets(meta, True)
    assert isinstance(buckets, DocumentBuckets)
    N = b.doc.numel()
    order = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N))
    q, k, v = qkv(N)
    ref, ref_grads = grads_of(lambda *t: dense_reference(*t, meta, True), q, k, v)
    out, out_grads = grads_of(
        buckets.reorder(order, inverse).attend, q[order], k[order], v[order], order=order
    )
    torch.testing.assert_close(out, ref[order], atol=1e-5, rtol=1e-5)
    for g, r in zip(out_grads, ref_grads):
        torch.testing.assert_close(g, r[order], atol=1e-5, rtol=1e-5)


def test_every_position_has_one_slot_and_padding_slots_see_padding_only(tok):
    b = many_short_documents(tok)
    buckets = document_buckets(meta_of(b), True)
    N = b.doc.numel()
    assert torch.equal(buckets.src[buckets.dst], torch.arange(N))  # each position reads itself back
    assert sum(n * L for n, L in buckets.sizes) == buckets.src.numel()
    for (n, L), mask in zip(buckets.sizes, buckets.masks):
        assert (
            mask.shape == (n, 1, L, L) and (mask == 0).any(dim=-1).all()
        )  # no empty row: softmax stays finite


def test_one_document_per_row_keeps_the_dense_mask(tok):
    d = encode_document([Text("a long caption " * 8)], tok, 4)
    b = collate([[d], [d]], len(d), tok.pad)
    meta = meta_of(b)
    assert isinstance(build_mask("documents", meta, meta, True), torch.Tensor)


def test_documents_backend_is_for_full_passes(tok):
    b = many_short_documents(tok)
    meta = meta_of(b)
    with pytest.raises(ValueError, match="full-sequence"):
        build_mask("documents", meta, meta.cat(meta), True)


def test_bucket_lengths_round_up_by_at_most_a_quarter():
    n = torch.arange(1, 3000)
    L = bucket_length(n)
    assert (L >= n).all() and (L % 4 == 0).all()
    assert (4 * L[n >= 16] <= 5 * n[n >= 16]).all()
    assert bucket_length(torch.tensor([8, 9, 64, 65, 159, 256, 257])).tolist() == [
        8,
        12,
        64,
        80,
        160,
        256,
        320,
    ]


def test_documents_of_one_bucket_length_attend_in_place():
    """Rows of 64-position documents (text, a 16-patch image, text): the slots are the positions."""
    pos = torch.arange(256)
    doc, within = pos // 64, pos % 64
    image = torch.where((within >= 24) & (within < 40), doc, -1)
    meta = SeqMeta(doc.view(2, 128), image.view(2, 128), (pos % 128).view(2, 128))
    buckets = document_buckets(meta, True)
    assert buckets.identity and buckets.sizes == ((4, 64),)
    q, k, v = qkv(256)
    ref, ref_grads = grads_of(lambda *t: dense_reference(*t, meta, True), q, k, v)
    out, out_grads = grads_of(buckets.attend, q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(out_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
