import pytest
import torch
from conftest import random_batch

from motfusion.sequence import (
    IGNORE,
    IMAGE,
    TEXT,
    Image,
    Packer,
    Prefetcher,
    Text,
    collate,
    encode_document,
    pack_documents,
)
from motfusion.tokenizer import ByteTokenizer, train_bpe


def img(size=8):
    return Image(torch.zeros(3, size, size))


def test_encode_layout_and_targets(tok):
    enc = encode_document([Text("ab"), img(), Text("c")], tok, patch_size=4)
    P = tok.pad
    assert enc.tokens == [tok.bos, 97, 98, tok.boi, P, P, P, P, tok.eoi, 99, tok.eos]
    assert enc.modality == [TEXT] * 4 + [IMAGE] * 4 + [TEXT] * 3
    assert enc.image_slot == [-1] * 4 + [0] * 4 + [-1] * 3
    targets = collate([[enc]], len(enc), tok.pad).targets[0].tolist()
    I = IGNORE
    # BOS->a, a->b, b->BOI (the model learns to open an image), no loss on the patches or on the
    # EOI that closes the image (appended, not predicted), EOI->c, c->EOS, nothing after EOS.
    assert targets == [97, 98, tok.boi, I, I, I, I, I, 99, tok.eos, I]


def test_image_first_flag(tok):
    flags = lambda doc: encode_document(doc, tok, 4).image_first
    assert flags([img(), Text("a red circle")]) == [True]  # captioning: noise cap applies
    assert flags([Text("a red circle"), img()]) == [False]  # generation
    assert flags([img()]) == [False]  # caption dropped for CFG: still a generation target
    assert flags([img(), Text("x"), img(), Text("y")]) == [True, False]


def test_collate_indices(tok):
    docs = [encode_document([Text("hi"), img()], tok, 4), encode_document([img(), Text("x")], tok, 4)]
    b = collate([docs, docs[:1]], 40, tok.pad)
    B, T = b.shape
    assert (B, T) == (2, 40) and b.images.shape == (3, 3, 8, 8)
    n0 = len(docs[0])
    assert b.doc[0, :n0].eq(0).all() and b.doc[0, n0 : n0 + len(docs[1])].eq(1).all()
    assert b.doc[0, n0 + len(docs[1]) :].eq(-1).all()  # padding
    assert b.pos[0, n0] == 0 and b.pos[0, n0 - 1] == n0 - 1  # positions restart per document
    flat_mod, flat_img = b.modality.flatten(), b.image.flatten()
    for i in range(3):  # every image's patch positions are image positions carrying its id, in order
        idx = b.image_index[i]
        assert flat_mod[idx].eq(IMAGE).all() and flat_img[idx].eq(i).all()
        assert (idx[1:] > idx[:-1]).all()
    assert b.image_first.tolist() == [False, True, False]
    assert torch.equal(torch.sort(torch.cat(list(b.modality_index.values()))).values, torch.arange(B * T))
    assert b.targets.flatten()[b.text_loss_index].ne(IGNORE).all()


def test_collate_rejects_overflow_and_bad_input(tok):
    enc = encode_document([Text("x" * 30)], tok, 4)
    with pytest.raises(ValueError, match="seq_len"):
        collate([[enc]], 10, tok.pad)
    with pytest.raises(ValueError, match="empty document"):
        encode_document([], tok, 4)
    with pytest.raises(ValueError, match="patch_size"):
        encode_document([Image(torch.zeros(3, 6, 6))], tok, 4)
    with pytest.raises(ValueError, match="unknown segment"):
        encode_document(["plain string"], tok, 4)


def test_packer_is_deterministic_and_resumable(tok):
    docs = lambda i: encode_document([Text(f"doc {i} " * (1 + i % 3)), img()], tok, 4)
    a = Packer(docs, batch_size=2, seq_len=64, pad_id=tok.pad)
    first = a.next_batch()
    state = a.state_dict()
    second = a.next_batch()
    b = Packer(docs, batch_size=2, seq_len=64, pad_id=tok.pad)
    b.load_state_dict(state)
    assert torch.equal(b.next_batch().tokens, second.tokens)
    assert not torch.equal(first.tokens, second.tokens)
    assert first.doc.max() >= 1  # several documents per row


def test_prefetcher_gives_the_packers_batches_and_the_state_of_the_last_one_handed_out(tok):
    docs = lambda i: encode_document([Text(f"doc {i} " * (1 + i % 3)), img()], tok, 4)
    plain, ahead = (Packer(docs, batch_size=2, seq_len=64, pad_id=tok.pad) for _ in range(2))
    pre = Prefetcher(ahead)
    states = []
    for _ in range(4):
        assert torch.equal(pre.next_batch().tokens, plain.next_batch().tokens)
        assert pre.state_dict() == plain.state_dict()  # not the state after the batch being built
        states.append(pre.state_dict())
    assert ahead.state_dict() != plain.state_dict()  # it did build ahead
    pre.load_state_dict(states[1])  # resume, with a build in flight
    plain.load_state_dict(states[1])
    assert pre.state_dict() == states[1]
    assert torch.equal(pre.next_batch().tokens, plain.next_batch().tokens)


def test_prefetcher_raises_a_documents_error_for_the_batch_that_needs_it(tok):
    def docs(i):
        if i >= 6:
            raise ValueError(f"document {i} is broken")
        return encode_document([Text("d" * 20)], tok, 4)

    pre = Prefetcher(Packer(docs, batch_size=1, seq_len=64, pad_id=tok.pad))
    pre.next_batch()  # documents 0-1 (a third does not fit in 64 positions), then 2-3, built ahead
    pre.next_batch()
    with pytest.raises(ValueError, match="document 6 is broken"):
        pre.next_batch()


def test_random_batches_are_consistent(tok):
    b = random_batch(tok, seed=3)
    assert b.images.shape[0] == b.image_index.shape[0] > 1
    assert (b.image >= 0).sum() == b.image_index.numel()


def test_byte_tokenizer_roundtrip():
    t = ByteTokenizer()
    s = "a red circle · ünïcode"
    assert t.decode(t.encode(s)) == s
    assert len({t.pad, t.bos, t.eos, t.boi, t.eoi}) == 5 and min(t.pad, t.bos) >= 256
    assert t.vocab_size > t.eoi


def test_bpe_tokenizer(tmp_path):
    texts = ["a red circle on the left", "two blue squares", "a green triangle above a yellow circle"] * 20
    t = train_bpe(texts, vocab_size=300, path=tmp_path / "bpe.json")
    ids = t.encode("a red circle")
    assert t.decode(ids) == "a red circle" and len(ids) < len("a red circle")
    assert t.boi != t.eoi and t.is_special(t.boi)


def test_pack_documents_fills_rows_in_order(tok):
    docs = [[Text("x" * 20), img()] for _ in range(5)]
    b = pack_documents(docs, tok, 4, seq_len=64)
    per_doc = len(encode_document(docs[0], tok, 4))
    assert b.shape == (5 // (64 // per_doc) + (5 % (64 // per_doc) > 0), 64)
    assert b.images.shape[0] == 5
    assert (b.doc.max(dim=1).values + 1).sum() == 5
