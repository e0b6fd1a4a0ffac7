import dataclasses

import pytest
import torch
from conftest import random_batch

from motfusion.models.attention import SeqMeta, attend, dense_mask, flex_block_mask
from motfusion.models.transfusion import TransfusionModel
from motfusion.sequence import Image, Text, collate, encode_document


def meta_of(batch):
    B, T = batch.shape
    return SeqMeta(batch.doc, batch.image, torch.arange(T).expand(B, T))


def reference_mask(doc, image, bidirectional):
    """The rule written out position by position."""
    T = len(doc)
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            same_image = image[i] >= 0 and image[i] == image[j]
            m[i, j] = doc[i] == doc[j] and (j <= i or (bidirectional and same_image))
    return m


@pytest.fixture
def hand_built(tok):
    """Row: doc 0 = text, image A, text, image B; doc 1 = text; then padding."""
    im = Image(torch.zeros(3, 8, 4))  # 2 patches with patch_size 4
    d0 = encode_document([Text("a"), im, Text("b"), im], tok, 4)  # BOS a BOI A0 A1 EOI b BOI B0 B1 EOI EOS
    d1 = encode_document([Text("c")], tok, 4)  # BOS c EOS
    return collate([[d0, d1]], 18, tok.pad)


def test_mask_on_hand_built_sequence(hand_built):
    b = hand_built
    m = dense_mask(meta_of(b), meta_of(b), bidirectional=True)[0, 0]
    A0, A1, t_b, B0, B1 = 3, 4, 6, 8, 9
    assert m[A0, A1] and m[A1, A0]  # bidirectional inside image A
    assert m[B0, B1] and m[B1, B0]
    assert m[B0, A1] and not m[A1, B0]  # across images: causal only
    assert not m[2, A0]  # BOI does not see the patches after it
    assert m[t_b, A1] and not m[A0, t_b]  # text after the image sees it; not the reverse
    assert not m[12:15, :12].any() and not m[:12, 12:15].any()  # documents are isolated
    assert m[12:15, 12:15].equal(torch.ones(3, 3, dtype=torch.bool).tril())
    assert not m[:15, 15:].any() and m[15:, 15:].any()  # padding: invisible to tokens, sees itself
    assert m.equal(reference_mask(b.doc[0].tolist(), b.image[0].tolist(), True))
    causal = dense_mask(meta_of(b), meta_of(b), bidirectional=False)[0, 0]
    assert not causal[A0, A1] and causal[A1, A0]
    assert causal.equal(reference_mask(b.doc[0].tolist(), b.image[0].tolist(), False))
    assert m.any(dim=1).all()  # no empty rows anywhere, so softmax never sees -inf only


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_flex_forward_equals_sdpa(tok, seed, bidirectional):
    b = random_batch(tok, seed=seed, rows=2, seq_len=256)
    meta = meta_of(b)
    B, T = b.shape
    q, k, v = torch.randn(3, B, 4, T, 16).unbind(0)
    ref = attend(q, k, v, dense_mask(meta, meta, bidirectional))
    out = attend(q, k, v, flex_block_mask(meta, bidirectional))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_flex_model_equals_sdpa_model(tok, cfg):
    b = random_batch(tok, seed=5, rows=2, seq_len=256, image_size=8, patch_size=cfg.model.patch_size)
    torch.manual_seed(0)
    model = TransfusionModel(dataclasses.replace(cfg.model, attention_backend="sdpa"), tok.vocab_size)
    t = torch.rand(b.images.shape[0]) * 999
    ref = model(b, b.images, t)
    model.cfg.attention_backend = "flex"
    out = model(b, b.images, t)
    torch.testing.assert_close(out.hidden, ref.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image, ref.image, atol=1e-5, rtol=1e-5)


def test_flex_training_on_cpu_gives_clear_error(tok, cfg):
    b = random_batch(tok, seed=0, rows=1, seq_len=64)
    model = TransfusionModel(dataclasses.replace(cfg.model, attention_backend="flex"), tok.vocab_size)
    with pytest.raises(ValueError, match="attention_backend=sdpa"):
        model(b, b.images, torch.zeros(b.images.shape[0]))
