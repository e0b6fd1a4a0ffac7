"""The Transfusion objective and the model's information flow."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch

from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import (
    GlobalBatch,
    TransfusionObjective,
    alignment_pairs,
    info_nce,
)
from motfusion.sequence import IGNORE, Image, Text, collate, encode_document


@pytest.fixture
def model(cfg, tok):
    torch.manual_seed(0)
    return TransfusionModel(cfg.model, tok.vocab_size)


def test_loss_breakdown_matches_manual(model, tok, cfg):
    b = random_batch(tok, seed=0)
    obj = TransfusionObjective(cfg.objective)
    loss, parts = obj(model, b, torch.Generator().manual_seed(1))
    # Recompute by hand with the same noise draws.
    g = torch.Generator().manual_seed(1)
    N = b.images.shape[0]
    t = obj.process.sample_timesteps(N, g, "cpu", max_t=obj.max_timesteps(b.image_first))
    noise = torch.randn(b.images.shape, generator=g)
    out = model(b, obj.process.add_noise(b.images, noise, t), t)
    logits = model.text_logits(out.hidden)  # (B, T, V) everywhere
    text = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE)
    per_image = [F.mse_loss(out.image[i], noise[i]) for i in range(N)]
    image = torch.stack(per_image).mean()
    torch.testing.assert_close(parts["loss/text"], text)
    torch.testing.assert_close(parts["loss/image"], image)
    torch.testing.assert_close(loss, text + cfg.objective.image_loss_weight * image)


def test_noise_cap_applies_to_image_first_only(cfg):
    obj = TransfusionObjective(cfg.objective)
    first = torch.tensor([True, False] * 500)
    t = obj.process.sample_timesteps(
        1000, torch.Generator().manual_seed(0), "cpu", max_t=obj.max_timesteps(first)
    )
    assert t[first].max() <= 500 and t[~first].max() > 900
    off = TransfusionObjective(dataclasses.replace(cfg.objective, image_first_noise_cap=None))
    assert off.max_timesteps(first).min() == 1000


@pytest.mark.parametrize("diffusion", ["ddpm", "flow"])
def test_both_processes_train(model, tok, cfg, diffusion):
    b = random_batch(tok, seed=1)
    obj = TransfusionObjective(dataclasses.replace(cfg.objective, diffusion=diffusion))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        loss, _ = obj(model, b, g.manual_seed(0))  # the same noise each step: a fixed target to fit
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@torch.no_grad()
def test_information_flow(model, tok):
    """Text never sees the future; an image's patches see each other but not what follows the image."""
    im = torch.rand(3, 16, 16) * 2 - 1
    enc = encode_document([Text("ab"), Image(im), Text("cd")], tok, 4)
    b = collate([[enc]], len(enc), tok.pad)
    t = torch.full((1,), 300.0)
    base = model(b, b.images, t).hidden
    boi, first_patch = 3, 4  # the last patch is 4 + 15
    # Change the last patch of the image: earlier patches change (bidirectional), BOI and text before don't.
    im2 = im.clone()
    im2[:, -4:, -4:] = -im2[:, -4:, -4:]
    out = model(b, im2[None], t).hidden
    assert torch.allclose(out[0, : boi + 1], base[0, : boi + 1])
    assert not torch.allclose(out[0, first_patch], base[0, first_patch])
    # Change a text token after the image: nothing before it changes.
    b2 = collate([[encode_document([Text("ab"), Image(im), Text("cx")], tok, 4)]], len(enc), tok.pad)
    out = model(b2, b2.images, t).hidden
    assert torch.allclose(out[0, :-2], base[0, :-2]) and not torch.allclose(out[0, -2], base[0, -2])


@torch.no_grad()
def test_causal_image_attention_ablation(tok, cfg):
    torch.manual_seed(0)
    model = TransfusionModel(dataclasses.replace(cfg.model, image_attention="causal"), tok.vocab_size)
    im = torch.rand(3, 16, 16) * 2 - 1
    b = collate([[encode_document([Text("ab"), Image(im)], tok, 4)]], 24, tok.pad)
    t = torch.full((1,), 300.0)
    base = model(b, b.images, t).hidden
    im2 = im.clone()
    im2[:, -4:, -4:] = 1.0
    out = model(b, im2[None], t).hidden
    assert torch.allclose(out[0, : 4 + 15], base[0, : 4 + 15])  # patches before the changed one: unchanged


def test_documents_in_a_row_are_independent(model, tok):
    """Packing must not leak: a document's outputs don't depend on its neighbours in the row."""
    d1 = encode_document([Text("a red circle"), Image(torch.rand(3, 8, 8))], tok, 4)
    d2 = encode_document([Image(torch.rand(3, 8, 8)), Text("two squares")], tok, 4)
    together = collate([[d1, d2]], 64, tok.pad)
    alone = collate([[d2]], 64, tok.pad)
    t = torch.tensor([100.0, 200.0])
    h_together = model(together, together.images, t).hidden[0, len(d1) : len(d1) + len(d2)]
    h_alone = model(alone, alone.images, t[1:]).hidden[0, : len(d2)]
    torch.testing.assert_close(h_together, h_alone, atol=1e-5, rtol=1e-5)


# ---- the optional image-text alignment loss (objective.contrastive_weight) ----------------------


def aligned(cfg, tok, weight: float = 0.5):
    """A model with align projections and the objective that uses them."""
    torch.manual_seed(0)
    model = TransfusionModel(dataclasses.replace(cfg.model, align_dim=16), tok.vocab_size)
    return model, TransfusionObjective(dataclasses.replace(cfg.objective, contrastive_weight=weight))


def pair_batch(tok):
    """Row 0: a caption-first doc and an image-first doc; row 1: an image whose caption was dropped,
    a text-only doc, and a second doc with row 0's first caption."""
    g = torch.Generator().manual_seed(0)
    im = [torch.rand(3, 16, 16, generator=g) * 2 - 1 for _ in range(4)]
    rows = [
        [[Text("a red circle"), Image(im[0])], [Image(im[1]), Text("two blue squares")]],
        [[Image(im[2])], [Text("only text")], [Text("a red circle"), Image(im[3])]],
    ]
    return collate([[encode_document(d, tok, 4) for d in row] for row in rows], 80, tok.pad)


def test_alignment_pairs_pool_each_image_and_the_text_of_its_document(tok):
    b = pair_batch(tok)
    hidden = torch.randn(*b.shape, 8)
    image, text, keys = alignment_pairs(hidden, b)
    expected_img, expected_txt = [], []
    for i in range(b.images.shape[0]):
        row, col = divmod(int(b.image_index[i, 0]), b.shape[1])
        doc = b.doc[row, col]
        same_doc_text = (b.doc[row] == doc) & (b.image[row] < 0)
        if b.image_caption[i] == 0:
            continue
        expected_img.append(hidden[row][b.image[row] == i].mean(0))
        expected_txt.append(hidden[row][same_doc_text].mean(0))
    assert image.shape[0] == 3  # the image without a caption has no pair
    torch.testing.assert_close(image, torch.stack(expected_img))
    torch.testing.assert_close(text, torch.stack(expected_txt))
    assert keys[0] == keys[2] != keys[1]  # the same caption, the same key


def test_contrastive_term_is_weighted_info_nce_with_equal_captions_as_matches(cfg, tok):
    b = pair_batch(tok)
    model, obj = aligned(cfg, tok, weight=0.5)
    plain = TransfusionObjective(cfg.objective)
    loss, parts = obj(model, b, torch.Generator().manual_seed(1))
    base, _ = plain(model, b, torch.Generator().manual_seed(1))
    out = model(b, *_noised(plain, b))
    image, text, keys = alignment_pairs(out.hidden, b)
    expected = info_nce(
        model.align["image"](image),
        model.align["text"](text),
        model.align_scale,
        positives=keys[:, None] == keys[None, :],
    )
    torch.testing.assert_close(parts["loss/contrastive"], expected)
    torch.testing.assert_close(loss, base + 0.5 * expected)
    loss.backward()
    for name in ("align.image.weight", "align.text.weight", "align_scale"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def _noised(obj, b):
    g = torch.Generator().manual_seed(1)
    t = obj.process.sample_timesteps(b.images.shape[0], g, "cpu", max_t=obj.max_timesteps(b.image_first))
    noise = torch.randn(b.images.shape, generator=g)
    return obj.process.add_noise(b.images, noise, t), t


def test_contrastive_training_aligns_images_with_their_captions(cfg, tok):
    """Trained on the contrastive term alone, each image comes to pick its own caption: the loss falls
    towards its floor, which is above zero because two images share a caption (their rows' targets
    split over both)."""
    b = pair_batch(tok)
    model, obj = aligned(cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = obj.contrastive_loss(model, model(b, *_noised(obj, b)).hidden, b, GlobalBatch.of(b))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    floor = 2 / 3 * math.log(2)  # two of the three rows each way have two matches
    assert losses[-1] - floor < 0.2 * (losses[0] - floor)


def test_contrastive_weight_needs_projections():
    from motfusion.errors import ConfigError
    from motfusion.recipes import get_recipe

    with pytest.raises(ConfigError, match="model.align_dim"):
        get_recipe("debug").override(["objective.contrastive_weight=0.1"])
    get_recipe("debug").override(["objective.contrastive_weight=0.1", "model.align_dim=32"])
