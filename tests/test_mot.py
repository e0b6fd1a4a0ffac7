"""The MoT backbone: tied towers equal dense, routing equals a per-token reference, gradient isolation,
and parameter counts that follow the formula."""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch

from motfusion.models.attention import SeqMeta, dense_mask
from motfusion.models.layers import apply_rope, rope_angles
from motfusion.models.mot import SHARED, weight_key
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.sequence import MODALITIES, Text, collate, encode_document


def model_with(cfg, vocab, **changes):
    torch.manual_seed(0)
    return TransfusionModel(dataclasses.replace(cfg.model, **changes), vocab)


def copy_dense_into_towers(dense, mot):
    """Give every tower of `mot` the dense model's weights: tower keys map to the shared key."""
    dense_state = dense.state_dict()
    towers = set(mot.cfg.towers.values())
    new = {}
    for name in mot.state_dict():
        parts = [SHARED if p in towers else p for p in name.split(".")]
        new[name] = dense_state[".".join(parts) if name.startswith("backbone.") else name]
    mot.load_state_dict(new)


@pytest.mark.parametrize("untie", [("ffn",), ("ffn", "attn"), ("ffn", "attn", "norm"), ("norm",)])
def test_tied_mot_equals_dense(tok, cfg, untie):
    b = random_batch(tok, seed=1)
    dense = model_with(cfg, tok.vocab_size, untie=())
    mot = model_with(cfg, tok.vocab_size, untie=untie)
    copy_dense_into_towers(dense, mot)
    t = torch.rand(b.images.shape[0]) * 999
    ref, out = dense(b, b.images, t), mot(b, b.images, t)
    torch.testing.assert_close(out.hidden, ref.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image, ref.image, atol=1e-5, rtol=1e-5)
    assert mot.num_params() > dense.num_params()


def test_untied_towers_differ_from_dense(tok, cfg):
    """Control for the test above: with independent towers the outputs do differ."""
    b = random_batch(tok, seed=1)
    dense, mot = model_with(cfg, tok.vocab_size, untie=()), model_with(cfg, tok.vocab_size)
    t = torch.zeros(b.images.shape[0])
    assert not torch.allclose(dense(b, b.images, t).hidden, mot(b, b.images, t).hidden, atol=1e-3)


def test_text_only_batch_gives_image_tower_no_gradient(tok, cfg):
    docs = [[encode_document([Text("a red circle")], tok, 4), encode_document([Text("two squares")], tok, 4)]]
    b = collate(docs, 48, tok.pad)
    model = model_with(cfg, tok.vocab_size)
    loss, parts = TransfusionObjective(cfg.objective)(model, b)
    loss.backward()
    assert torch.isfinite(loss) and parts["loss/image"] == 0
    grads = {n: p.grad for n, p in model.named_parameters()}
    image_tower = [n for n in grads if ".image." in n and n.startswith("backbone.")]
    text_tower = [n for n in grads if ".text." in n and n.startswith("backbone.")]
    assert image_tower and all(grads[n] is None for n in image_tower)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in text_tower)


def test_image_only_batch_works(tok, cfg):
    """Documents that are just an image (caption dropped): still BOS/BOI/EOI text around it."""
    from motfusion.sequence import Image

    docs = [[encode_document([Image(torch.rand(3, 8, 8) * 2 - 1)], tok, 4)]]
    b = collate(docs, 16, tok.pad)
    model = model_with(cfg, tok.vocab_size)
    loss, parts = TransfusionObjective(cfg.objective)(model, b)
    loss.backward()
    assert torch.isfinite(loss) and parts["loss/image"] > 0


def naive_block(block, x, towers, rope, mask):
    """Reference: every position, one at a time, through the weights of its own tower."""
    cfg = block.cfg
    B, T, D = x.shape
    H, hd = cfg.n_heads, cfg.head_dim
    key = lambda comp, b, i: weight_key(cfg, comp, towers[b][i])
    qkv = torch.empty(B, T, 3 * D)
    for b, i in itertools.product(range(B), range(T)):
        qkv[b, i] = block._qkv(towers[b][i], x[b, i][None])[0]
    q, k, v = qkv.view(B, T, 3, H, hd).unbind(2)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    y = y.transpose(1, 2).reshape(B, T, D)
    out = torch.empty_like(x)
    for b, i in itertools.product(range(B), range(T)):
        h = x[b, i] + block.wo[key("attn", b, i)](y[b, i])
        norm = block.ffn_norm[key("norm", b, i)]
        out[b, i] = h + block.ffn[key("ffn", b, i)](norm(h))
    return out


@torch.no_grad()
@pytest.mark.parametrize("untie", [("ffn", "attn", "norm"), ("ffn",), ()])
def test_indexed_routing_equals_per_token_reference(tok, cfg, untie):
    b = random_batch(tok, seed=2, rows=2, seq_len=96)
    model = model_with(cfg, tok.vocab_size, untie=untie)
    block = model.backbone.blocks[0]
    B, T = b.shape
    x = torch.randn(B, T, cfg.model.dim)
    rope = rope_angles(b.pos, cfg.model.head_dim, cfg.model.rope_theta)
    meta = SeqMeta(b.doc, b.image, torch.arange(T).expand(B, T))
    mask = dense_mask(meta, meta, True)
    names = {i: m for m, i in MODALITIES.items()}
    towers = [[model.cfg.towers[names[m]] for m in row] for row in b.modality.tolist()]
    out, _ = block(x, model.backbone.route(b.modality_index), rope, mask)
    torch.testing.assert_close(out, naive_block(block, x, towers, rope, mask), atol=1e-5, rtol=1e-5)


def expected_params(cfg, vocab, untie, n_towers):
    """Dense count plus (towers - 1) copies of every untied component."""
    D, F_, L, hd = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.head_dim
    C, k = cfg.image_channels, cfg.patch_size
    norm = L * (2 * D + 2 * hd) + D  # attn/ffn norms, q/k norms per layer, final norm
    attn = L * 4 * D * D
    ffn = L * 3 * D * F_
    adapters = 2 * vocab * D + (C * k * k * D + D) + (256 * D + D + D * D + D) + (D * C * k * k + C * k * k)
    copies = {"norm": norm, "attn": attn, "ffn": ffn}
    return adapters + norm + attn + ffn + (n_towers - 1) * sum(copies[c] for c in untie)


@pytest.mark.parametrize(
    "untie", [(), ("ffn",), ("attn",), ("norm",), ("ffn", "attn"), ("ffn", "attn", "norm")]
)
def test_param_count_formula(tok, cfg, untie):
    model = model_with(cfg, tok.vocab_size, untie=untie)
    assert model.num_params() == expected_params(model.cfg, tok.vocab_size, untie, n_towers=2)


def test_shared_tower_grouping(tok, cfg):
    """Modalities mapped to one tower share its weights: the model is then the dense one."""
    one = model_with(cfg, tok.vocab_size, towers={"text": "main", "image": "main"})
    dense = model_with(cfg, tok.vocab_size, untie=())
    assert one.num_params() == dense.num_params()
    assert one.backbone.route({"text": torch.arange(3), "image": torch.arange(3, 5)}) is None
    b = random_batch(tok, seed=4)
    t = torch.zeros(b.images.shape[0])
    torch.testing.assert_close(one(b, b.images, t).hidden, dense(b, b.images, t).hidden)


def test_unmapped_modality_is_a_clear_error(tok, cfg):
    model = model_with(cfg, tok.vocab_size, towers={"text": "text", "speech": "speech"})
    b = random_batch(tok, seed=0)
    with pytest.raises(ValueError, match="no tower"):
        model(b, b.images, torch.zeros(b.images.shape[0]))
