"""Images of different sizes in one batch: grouped by size, and equal to each image on its own."""

import dataclasses

import pytest
import torch

from motfusion.config import Config
from motfusion.models.layers import apply_rope, grid_positions, rope_angles
from motfusion.models.transfusion import TransfusionModel, grid_rope_positions
from motfusion.objectives import GlobalBatch, TransfusionObjective
from motfusion.recipes import get_recipe
from motfusion.sequence import Image, Text, collate, encode_document
from motfusion.training.flops import FlopCounter
from motfusion.training.trainer import build_optimizer, train_step

SIZES = (16, 8, 16, 24)  # two of one size, apart: the batch must regroup them


def docs(tok, sizes=SIZES):
    g = torch.Generator().manual_seed(0)
    out = []
    for i, s in enumerate(sizes):
        im = Image(torch.rand(3, s, s + 8 * (i % 2), generator=g) * 2 - 1)  # some not square
        out.append([Text(f"picture {i}"), im] if i % 2 == 0 else [im, Text(f"caption {i}")])
    return [encode_document(d, tok, 4) for d in out]


def mixed(tok, sizes=SIZES, seq_len=160):
    encoded = docs(tok, sizes)
    return collate([encoded[:2], encoded[2:]], seq_len, tok.pad), encoded


def test_collate_groups_images_by_size(tok):
    b, encoded = mixed(tok)
    sizes = [(g.height, g.width) for g in b.image_groups]
    assert sizes == [(16, 16), (8, 16), (24, 32)] and [g.count for g in b.image_groups] == [2, 1, 1]
    originals = [d.images[0] for d in encoded]
    order = [0, 2, 1, 3]  # the two 16x16 images first
    assert b.image_order.tolist() == order
    n = 0
    for rows, H, W, idx in b.groups():
        for j in range(rows.stop - rows.start):
            i = rows.start + j
            torch.testing.assert_close(b.images[i, :, :H, :W], originals[order[i]])
            assert (
                b.images[i, :, H:].abs().sum() == 0 and b.images[i, :, :, W:].abs().sum() == 0
            )  # zero padding
            assert torch.equal((b.image.flatten() == i).nonzero().squeeze(1), idx[j])  # its own positions
            assert idx.shape[1] == (H // 4) * (W // 4)
            n += 1
    assert n == 4
    assert b.image_first.tolist() == [False, False, True, True]  # image-first docs are 1 and 3


@pytest.mark.parametrize("patcher", ["linear", "unet"])
@torch.no_grad()
def test_mixed_batch_equals_each_document_alone(tok, patcher):
    cfg = get_recipe("debug").override([f"model.patcher={patcher}"])
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size).eval()
    b, encoded = mixed(tok)
    t = torch.tensor([100.0, 400.0, 700.0, 900.0])  # per image, in the batch's (grouped) order
    out = model(b, b.images, t)
    order = [0, 2, 1, 3]
    for i, enc in enumerate(encoded):
        alone = collate([[enc]], len(enc), tok.pad)
        k = order.index(i)  # where image i sits in the mixed batch
        ref = model(alone, alone.images, t[k : k + 1])
        row, start = (0, 0) if i < 2 else (1, 0)
        start = sum(len(e) for e in (encoded[:2] if i < 2 else encoded[2:])[: i % 2])
        torch.testing.assert_close(
            out.hidden[row, start : start + len(enc)], ref.hidden[0], atol=1e-5, rtol=1e-5
        )
        H, W = alone.images.shape[-2:]
        torch.testing.assert_close(out.image[k, :, :H, :W], ref.image[0], atol=1e-5, rtol=1e-5)


def test_loss_is_the_mean_over_each_image_of_its_own_pixels(tok):
    cfg = get_recipe("debug")
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size)
    obj = TransfusionObjective(cfg.objective)
    b, _ = mixed(tok)
    _, parts = obj(model, b, torch.Generator().manual_seed(3))
    t, noise = obj.draw(b, GlobalBatch.of(b), torch.Generator().manual_seed(3))
    out = model(b, obj.process.add_noise(b.images, noise, t), t)
    target = obj.process.target(b.images, noise, t)
    per_image = [
        (out.image[i] - target[i])[:, :H, :W].pow(2).mean()
        for rows, H, W, _ in b.groups()
        for i in range(rows.start, rows.stop)
    ]
    torch.testing.assert_close(parts["loss/image"], torch.stack(per_image).mean())


def test_draws_follow_documents_not_the_grouping(tok):
    """Two ranks (rows 0 and 1, each grouping its own sizes) draw for each image the timestep and
    noise that one process draws for it: 2 ranks == 1 process holds with mixed sizes."""
    obj = TransfusionObjective(get_recipe("debug").objective)
    whole, encoded = mixed(tok)
    total = GlobalBatch.of(whole)
    assert total.image_shape == (3, 24, 32)
    t, noise = obj.draw(whole, total, torch.Generator().manual_seed(5))
    by_doc = {int(d): (t[i], noise[i]) for i, d in enumerate(whole.image_order)}
    offset = 0
    for rank_docs in (encoded[:2], encoded[2:]):
        half = collate([rank_docs], 160, tok.pad)
        t_h, noise_h = obj.draw(
            half, dataclasses.replace(total, image_offset=offset), torch.Generator().manual_seed(5)
        )
        for i, d in enumerate(half.image_order.tolist()):
            H, W = half.images.shape[-2:]
            assert t_h[i] == by_doc[offset + d][0]
            torch.testing.assert_close(noise_h[i], by_doc[offset + d][1][:, :H, :W])
        offset += half.images.shape[0]


def test_flops_of_a_mixed_batch_add_up(tok):
    cfg = get_recipe("debug").override(["model.patcher=unet"])
    model = TransfusionModel(cfg.model, tok.vocab_size)
    counter = FlopCounter(model)
    b, encoded = mixed(tok)
    alone = [counter.count(collate([[e]], len(e), tok.pad)).flops for e in encoded]
    total = counter.count(b).flops
    for m in ("text", "image"):
        assert total[m] == sum(a[m] for a in alone)


def test_a_mixed_batch_trains(tok):
    cfg = get_recipe("debug").override(["model.patcher=unet"])
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size)
    obj, opt = TransfusionObjective(cfg.objective), build_optimizer(model, cfg.train)
    b, _ = mixed(tok)
    losses = [
        train_step(model, obj, opt, b, torch.Generator().manual_seed(0), 3e-3, 1.0)["loss"] for _ in range(20)
    ]
    assert losses[-1] < 0.7 * losses[0]


def test_grid_positions_encode_row_and_column():
    """Half the channels depend on the row only, half on the column only, and no two patches match."""
    e = grid_positions(3, 5, 16).view(3, 5, 16)
    assert torch.equal(e[:, :, :8], e[:, :1, :8].expand(3, 5, 8))  # row half: the same along a row
    assert torch.equal(e[:, :, 8:], e[:1, :, 8:].expand(3, 5, 8))  # column half: the same down a column
    assert torch.cdist(e.view(15, 16), e.view(15, 16)).add(torch.eye(15)).min() > 0.1


def test_grid_pos_moves_the_image_tokens_and_old_configs_load_without_it(tok):
    """With the same weights, model.grid_pos changes every image's prediction; a config saved before the
    key existed (no model.grid_pos) loads as False, so an old checkpoint keeps meaning what it meant."""
    cfg = get_recipe("debug")
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size).eval()
    torch.nn.init.normal_(model.image.proj_out.weight, std=0.05)
    b, _ = mixed(tok)
    t = torch.full((len(SIZES),), 500.0)
    with torch.no_grad():
        with_pos = model(b, b.images, t).image
        model.cfg = dataclasses.replace(cfg.model, grid_pos=False)
        without = model(b, b.images, t).image
    assert cfg.model.grid_pos and (with_pos - without).abs().flatten(1).max(dim=1).values.min() > 1e-4
    saved = cfg.to_dict()
    del saved["model"]["grid_pos"]
    assert Config.from_dict(saved).model.grid_pos is False
    assert Config.from_dict(cfg.to_dict()).model.grid_pos is True


def test_rope_2d_positions_are_row_and_column_from_the_image_start(tok):
    """Each patch of each image (three sizes, some not square) gets (p0 + row, p0 + column); text and
    markers keep their 1D position on both halves."""
    b, _ = mixed(tok)
    rows, cols = grid_rope_positions(b, list(b.groups()), 4)
    pos, seen = b.pos.flatten(), torch.zeros(b.pos.numel(), dtype=torch.bool)
    for _, _, W, idx in b.groups():
        for image in idx:
            p0, i = pos[image[0]], torch.arange(len(image))
            assert torch.equal(rows.flatten()[image], p0 + i // (W // 4))
            assert torch.equal(cols.flatten()[image], p0 + i % (W // 4))
            seen[image] = True
    assert torch.equal(rows.flatten()[~seen], pos[~seen]) and torch.equal(cols.flatten()[~seen], pos[~seen])


def test_rope_2d_scores_depend_on_the_row_and_column_offset():
    """q . k after 2D RoPE is the same for any two pairs of positions with the same (row, column)
    offset, and 1D RoPE when both axes hold the same position."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=g).unbind(0)  # (1, 1, 1, 16): B, T, H, hd

    def score(qa, qb, ka, kb):
        rq = rope_angles(torch.tensor([[qa]]), 16, 100.0, torch.tensor([[qb]]))
        rk = rope_angles(torch.tensor([[ka]]), 16, 100.0, torch.tensor([[kb]]))
        return (apply_rope(q, *rq) * apply_rope(k, *rk)).sum()

    torch.testing.assert_close(score(5, 7, 6, 9), score(12, 3, 13, 5))  # offset (1, 2) both times
    assert (score(5, 7, 6, 9) - score(5, 7, 7, 8)).abs() > 1e-3  # offsets (1, 2) and (2, 1) differ
    one_d = rope_angles(torch.tensor([[4, 9]]), 16, 100.0)
    for a, b in zip(one_d, rope_angles(torch.tensor([[4, 9]]), 16, 100.0, torch.tensor([[4, 9]]))):
        torch.testing.assert_close(a, b)


def test_rope_2d_moves_image_tokens_only(tok):
    """With the same weights, model.rope_2d changes every image's prediction, and nothing of a
    text-only batch."""
    cfg = get_recipe("debug")
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size).eval()
    torch.nn.init.normal_(model.image.proj_out.weight, std=0.05)
    b, _ = mixed(tok)
    text = collate([[encode_document([Text("only words here")], tok, 4)]], 32, tok.pad)
    t = torch.full((len(SIZES),), 500.0)
    with torch.no_grad():
        before = model(b, b.images, t).image, model(text, text.images, t[:0]).hidden
        model.cfg = dataclasses.replace(cfg.model, rope_2d=True)
        after = model(b, b.images, t).image, model(text, text.images, t[:0]).hidden
    assert (before[0] - after[0]).abs().flatten(1).max(dim=1).values.min() > 1e-4
    torch.testing.assert_close(before[1], after[1], atol=0, rtol=0)
