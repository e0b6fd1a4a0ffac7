"""train.optimizer=muon: Newton-Schulz orthogonalization, the update against a hand computation, which
parameters Muon steps, and exact resume (2 ranks == 1 process: tests/test_distributed.py)."""

import math
import shutil

import pytest
import torch
from test_training import losses, small_cfg

from motfusion.errors import ConfigError
from motfusion.models.transfusion import TransfusionModel
from motfusion.recipes import get_recipe
from motfusion.training.checkpoint import step_dir
from motfusion.training.muon import MOMENTUM, NS_COEFFICIENTS, NS_STEPS, MuonAdamW, orthogonalize
from motfusion.training.trainer import build_optimizer, train


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (3, 32, 32)])
def test_orthogonalize_pushes_every_singular_value_toward_one(shape):
    """For a matrix whose singular values span 0.1 .. 10, every one of the result lies in the band
    the quintic iteration aims at (about 0.7 - 1.2), tall, wide or batched."""
    g = torch.Generator().manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(shape, generator=g), full_matrices=False)
    spread = torch.logspace(-1, 1, u.shape[-1])
    x = u @ torch.diag_embed(spread.expand(*u.shape[:-2], -1)) @ vh
    s = torch.linalg.svdvals(orthogonalize(x))
    assert s.min() > 0.6 and s.max() < 1.25
    assert torch.linalg.svdvals(x).max() / torch.linalg.svdvals(x).min() > 50


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (3, 40, 24), (2, 3, 8, 8)])
def test_orthogonalize_is_the_quintic_newton_schulz_iteration(shape):
    """The fused kernels compute the iteration as Jordan et al. write it, X <- a X + (b A + c A^2) X
    with A = X X^T on the wide side, one matrix at a time in float64, for any leading dims."""
    a, b, c = NS_COEFFICIENTS
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected = []
    for m in g.double().reshape(-1, *shape[-2:]):
        x = m if m.shape[0] <= m.shape[1] else m.T
        x = x / (torch.linalg.matrix_norm(x) + 1e-7)
        for _ in range(NS_STEPS):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        expected.append(x if m.shape[0] <= m.shape[1] else x.T)
    torch.testing.assert_close(
        orthogonalize(g), torch.stack(expected).view(shape).float(), atol=1e-5, rtol=1e-4
    )


def test_muon_update_matches_a_hand_computation():
    """Two steps: the matrix follows decoupled decay and the orthogonalized Nesterov momentum at
    AdamW's RMS (0.2 sqrt(max side)); the vector in the other group steps exactly as torch's AdamW."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 4, generator=g).requires_grad_(), torch.randn(4, generator=g).requires_grad_()
    b_ref = b.detach().clone().requires_grad_()
    lr, decay = 0.01, 0.1
    opt = MuonAdamW(
        [{"params": [w], "weight_decay": decay, "muon": True}, {"params": [b], "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    ref = torch.optim.AdamW([b_ref], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    expected, buf = w.detach().clone(), torch.zeros(8, 4)
    for _ in range(2):
        gw, gb = torch.randn(8, 4, generator=g), torch.randn(4, generator=g)
        w.grad, b.grad, b_ref.grad = gw, gb, gb.clone()
        opt.step()
        ref.step()
        buf = MOMENTUM * buf + gw
        expected = expected * (1 - lr * decay) - lr * 0.2 * math.sqrt(8) * orthogonalize(gw + MOMENTUM * buf)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, b_ref, rtol=0, atol=0)


def test_muon_steps_a_conv_filter_as_its_matrix():
    """A conv filter (out, in, k, k) steps as the matrix (out, in k k) would, at 0.2 sqrt(in k k)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 2, 3, 3, generator=g).requires_grad_()
    lr, decay = 0.01, 0.1
    opt = MuonAdamW([{"params": [w], "weight_decay": decay, "muon": True}], lr=lr, betas=(0.9, 0.95))
    expected, buf = w.detach().clone().flatten(1), torch.zeros(6, 18)
    for _ in range(2):
        gw = torch.randn(6, 2, 3, 3, generator=g)
        w.grad = gw
        opt.step()
        buf = MOMENTUM * buf + gw.flatten(1)
        update = orthogonalize(gw.flatten(1) + MOMENTUM * buf)
        expected = expected * (1 - lr * decay) - lr * 0.2 * math.sqrt(18) * update
    torch.testing.assert_close(w.detach(), expected.view(6, 2, 3, 3), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="2-D weight matrices and 4-D conv filters"):
        MuonAdamW([{"params": [torch.zeros(3, requires_grad=True)], "muon": True}], lr=lr, betas=(0.9, 0.95))


def test_muon_steps_the_backbone_matrices_and_adamw_the_rest(tok):
    """Muon gets exactly the blocks' attention and FFN matrices of every tower; embeddings, heads,
    norms and the U-Net patcher stay on AdamW; decay as with AdamW alone."""
    cfg = get_recipe("debug").override(["model.patcher=unet", "train.optimizer=muon"])
    model = TransfusionModel(cfg.model, tok.vocab_size)
    opt = build_optimizer(model, cfg.train)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for gr in opt.param_groups if gr["muon"] for p in gr["params"]}
    assert muon == {
        n for n, p in model.named_parameters() if n.startswith("backbone.blocks.") and p.ndim == 2
    }
    assert any(".image." in n for n in muon) and any(".text." in n for n in muon)  # both towers
    assert all(gr["weight_decay"] == cfg.train.weight_decay for gr in opt.param_groups if gr["muon"])
    assert sum(len(gr["params"]) for gr in opt.param_groups) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="train.optimizer"):
        get_recipe("debug").override(["train.optimizer=sgd"])


def test_muon_convs_adds_the_unet_filters_but_stem_and_output(tok):
    """train.muon_convs: Muon also gets every 4-D U-Net filter except the stem and the output conv."""
    cfg = get_recipe("debug").override(
        ["model.patcher=unet", "train.optimizer=muon", "train.muon_convs=true"]
    )
    model = TransfusionModel(cfg.model, tok.vocab_size)
    opt = build_optimizer(model, cfg.train)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for gr in opt.param_groups if gr["muon"] for p in gr["params"]}
    filters = {n for n, p in model.named_parameters() if n.startswith("image.") and p.ndim == 4}
    assert {"image.stem.weight", "image.proj_out.weight"} < filters
    backbone = {n for n, p in model.named_parameters() if n.startswith("backbone.blocks.") and p.ndim == 2}
    assert muon == backbone | filters - {"image.stem.weight", "image.proj_out.weight"}
    assert sum(len(gr["params"]) for gr in opt.param_groups) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="train.muon_convs=true needs train.optimizer=muon"):
        get_recipe("debug").override(["train.muon_convs=true"])


def test_resume_with_muon_is_exact(tmp_path):
    """The momentum buffers are saved and restored: 8 steps straight == 8 steps that died after the
    step-4 checkpoint and resumed; and Muon's run differs from AdamW's."""
    cfg = small_cfg(
        "train.steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=0", "train.optimizer=muon"
    )
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(cfg, straight)
    train(cfg, crashed)
    shutil.rmtree(step_dir(crashed, 8))
    train(cfg, crashed, resume=True)
    assert losses(crashed) == losses(straight)
    train(cfg.override(["train.optimizer=adamw"]), tmp_path / "adamw")
    assert losses(tmp_path / "adamw")[-1] != losses(straight)[-1]
