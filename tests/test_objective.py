"""The Transfusion objective and the model's information flow."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from motfusion.config import ObjectiveConfig
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.sequence import IGNORE, Image, Text, collate, encode_document

from conftest import random_batch


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
    t = obj.process.sample_timesteps(1000, torch.Generator().manual_seed(0), "cpu", max_t=obj.max_timesteps(first))
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
    boi, first_patch, last_patch = 3, 4, 4 + 15
    # Change the last patch of the image: earlier patches change (bidirectional), BOI and text before don't.
    im2 = im.clone()
    im2[:, -4:, -4:] = -im2[:, -4:, -4:]
    out = model(b, im2[None], t).hidden
    assert torch.allclose(out[0, :boi + 1], base[0, :boi + 1])
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
    assert torch.allclose(out[0, :4 + 15], base[0, :4 + 15])  # patches before the changed one: unchanged


def test_documents_in_a_row_are_independent(model, tok):
    """Packing must not leak: a document's outputs don't depend on its neighbours in the row."""
    d1 = encode_document([Text("a red circle"), Image(torch.rand(3, 8, 8))], tok, 4)
    d2 = encode_document([Image(torch.rand(3, 8, 8)), Text("two squares")], tok, 4)
    together = collate([[d1, d2]], 64, tok.pad)
    alone = collate([[d2]], 64, tok.pad)
    t = torch.tensor([100.0, 200.0])
    h_together = model(together, together.images, t).hidden[0, len(d1):len(d1) + len(d2)]
    h_alone = model(alone, alone.images, t[1:]).hidden[0, :len(d2)]
    torch.testing.assert_close(h_together, h_alone, atol=1e-5, rtol=1e-5)
