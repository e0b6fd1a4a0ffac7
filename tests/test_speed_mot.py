"""The MoT backbone's fast paths equal a plain reference, outputs and gradients: the residual stream in
tower order (towers' matmuls on views), document-bucketed attention gathering from that order, and
complex-number RoPE; for text-only, image-only, mixed and three-modality batches, and under the KV cache."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch

from motfusion.models.attention import DocumentBuckets, SeqMeta, build_mask, dense_mask
from motfusion.models.layers import apply_rope, rope_angles
from motfusion.models.mot import weight_key
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.sampling.context import Context
from motfusion.sequence import MODALITIES, Image, Text, Units, collate, encode_document

THREE = {"towers": {"text": "text", "image": "image", "speech": "speech"}, "vocab_sizes": {"speech": 50}}


def model_with(cfg, vocab, **changes):
    torch.manual_seed(0)
    return TransfusionModel(dataclasses.replace(cfg.model, **changes), vocab)


def reference_rope(x, cos, sin):
    """Pairs (x[2i], x[2i+1]) rotated with real arithmetic."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def per_tower(x, masks, fn):
    """fn(tower, x[mask]) written back under each tower's boolean mask over the N positions."""
    parts = {t: fn(t, x[m]) for t, m in masks.items() if m.any()}
    out = x.new_zeros(x.shape[0], next(iter(parts.values())).shape[-1])
    for t, y in parts.items():
        out = out.index_put((masks[t],), y)
    return out


def reference_backbone(backbone, batch):
    """The backbone in row order with boolean tower masks and the dense mask: what the fast paths replace."""
    cfg = backbone.cfg
    names = {i: m for m, i in MODALITIES.items()}
    towers = [cfg.towers.get(names[i], "?") for i in batch.modality.flatten().tolist()]
    dense = all(weight_key(cfg, c, "x") == "shared" for c in ("attn", "ffn", "norm"))
    masks = {t: torch.tensor([tw == t for tw in towers]) for t in set(towers)}
    if dense:
        masks = {"shared": torch.ones(len(towers), dtype=torch.bool)}

    def forward(x, route, rope, mask, cache=None):
        B, T, D = x.shape
        H, hd = cfg.n_heads, cfg.head_dim
        meta = SeqMeta(batch.doc, batch.image, torch.arange(T).expand(B, T))
        mask = dense_mask(meta, meta, cfg.image_attention == "bidirectional")
        xf = x.reshape(B * T, D)
        for blk in backbone.blocks:
            q, k, v = per_tower(xf, masks, blk._qkv).view(B, T, 3, H, hd).unbind(2)
            q, k = reference_rope(q, *rope), reference_rope(k, *rope)
            y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
            wo = lambda t, ys, blk=blk: blk.wo[blk._key("attn", t)](ys)
            xf = xf + per_tower(y.transpose(1, 2).reshape(B * T, D), masks, wo)
            xf = xf + per_tower(xf, masks, blk._ffn)
        norm = lambda t, xs: backbone.final_norm[weight_key(cfg, "norm", t)](xs)
        return per_tower(xf, masks, norm).view(B, T, D), []

    return forward


def loss_and_grads(model, objective, batch):
    loss, _ = objective(model, batch, torch.Generator().manual_seed(0), None)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_fast_equals_reference(cfg, tok, batch, **changes):
    """Loss and every parameter's gradient: the model as it runs vs the reference backbone."""
    objective = TransfusionObjective(cfg.objective)
    fast, ref = model_with(cfg, tok.vocab_size, **changes), model_with(cfg, tok.vocab_size, **changes)
    ref.backbone.forward = reference_backbone(ref.backbone, batch)
    loss, grads = loss_and_grads(fast, objective, batch)
    ref_loss, ref_grads = loss_and_grads(ref, objective, batch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def uses_buckets(batch) -> bool:
    B, T = batch.shape
    meta = SeqMeta(batch.doc, batch.image, torch.arange(T).expand(B, T))
    return isinstance(build_mask("documents", meta, meta, True), DocumentBuckets)


def docs_batch(tok, docs, rows=2):
    enc = [encode_document(d, tok, 4) for d in docs]
    return collate([enc] * rows, sum(map(len, enc)) + 3, tok.pad)


def image(seed, size=8):
    return Image(torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1)


@pytest.mark.parametrize("untie", [("ffn", "attn", "norm"), ("ffn",), ()])
@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_batch_equals_reference(tok, cfg, untie, seed):
    b = random_batch(tok, seed=seed, rows=3, seq_len=160)
    assert_fast_equals_reference(cfg, tok, b, untie=untie)


def test_text_only_batch_equals_reference(tok, cfg):
    b = docs_batch(tok, [[Text(s)] for s in ("a red circle", "two squares", "xyz", "a blue", "one", "two")])
    assert uses_buckets(b)
    assert_fast_equals_reference(cfg, tok, b)


def test_image_only_documents_equal_reference(tok, cfg):
    """Documents holding one image each (their only text is the markers)."""
    b = docs_batch(tok, [[image(i, size=16)] for i in range(8)])
    assert uses_buckets(b)
    assert_fast_equals_reference(cfg, tok, b)


def test_three_towers_equal_reference(tok, cfg):
    docs = [
        [Text("abc"), image(0)],
        [Units("speech", list(range(1, 9))), Text("de")],
        [image(1), Text("f")],
        [Text("gh"), Units("speech", [3, 4, 5])],
    ]
    b = docs_batch(tok, docs)
    assert uses_buckets(b)
    assert_fast_equals_reference(cfg, tok, b, **THREE)


def test_dense_mask_path_equals_reference(tok, cfg):
    """One long document per row: attention keeps the dense mask, so q, k, v go back to row order."""
    b = docs_batch(tok, [[Text("a long caption, " * 4), image(0), Text("and more text")]], rows=2)
    assert not uses_buckets(b)
    assert_fast_equals_reference(cfg, tok, b)
    assert_fast_equals_reference(cfg, tok, b, **THREE)


def test_complex_rope_equals_real_arithmetic():
    x = torch.randn(2, 7, 3, 16)
    cos, sin = rope_angles(torch.randint(0, 50, (2, 7)), 16, 10000.0)
    torch.testing.assert_close(apply_rope(x, cos, sin), reference_rope(x, cos, sin), atol=1e-6, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("changes", [{}, THREE])
def test_kv_cache_equals_recompute_with_tower_order(tok, cfg, changes):
    """Cached chunks (row order for attention, image-only chunks: one tower) give the logits and
    images of re-running the whole sequence each time (tower order)."""
    model = model_with(cfg, tok.vocab_size, **changes).eval()
    prompts = [
        encode_document([Text("ab"), image(0), Text("c")], tok, 4, close=False),
        encode_document([Text("d")] + ([Units("speech", [1, 2])] if changes else []), tok, 4, close=False),
    ]
    x, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.full((2,), 500.0)
    outs = []
    for use_cache in (True, False):
        ctx = Context(model, use_cache)
        first = ctx.run(ctx.prompt(prompts, tok.pad)).hidden[:, -1]
        token = ctx.run(ctx.tokens(torch.tensor([tok.boi, tok.boi]))).hidden[:, -1]
        pred = ctx.run(ctx.image(x, t, 4), commit=False).image  # an image-only chunk
        outs.append((first, token, pred))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "untie, per_tower_calls",
    [(("ffn",), {"wqkv": 1, "wo": 1, "ffn": 2}), (("attn",), {"wqkv": 2, "wo": 2, "ffn": 1})],
)
def test_a_shared_step_runs_once_on_the_whole_stream(tok, cfg, untie, per_tower_calls):
    """Under a partial untie, a step whose weights (and norm) are all shared is one call over every
    token, not one per tower; the untied steps still run per tower. Outputs: tests/test_mot.py."""
    b = random_batch(tok, seed=3)
    model = model_with(cfg, tok.vocab_size, untie=untie)
    block = model.backbone.blocks[0]
    calls = {name: 0 for name in per_tower_calls}
    for name in calls:
        for module in getattr(block, name).values():
            module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    assert set(b.modality.unique().tolist()) == {MODALITIES["text"], MODALITIES["image"]}  # both towers
    model(b, b.images, torch.zeros(b.images.shape[0]))
    assert calls == per_tower_calls
