"""MoT's hybrid: the text tower's FFN as a mixture of experts. Routing, gradient flow, the balance
loss, FLOPs per token, and the model and objective around it."""

import dataclasses

import pytest
import torch
from conftest import random_batch
from torch.utils.flop_counter import FlopCounterMode

from motfusion.errors import ConfigError
from motfusion.models.layers import SwiGLU
from motfusion.models.moe import MoEFFN, balance_loss
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.recipes import get_recipe
from motfusion.training.logging import read_metrics
from motfusion.training.trainer import train

D, F_, E = 16, 32, 4


def moe(top_k: int, seed: int = 0) -> MoEFFN:
    torch.manual_seed(seed)
    m = MoEFFN(D, F_, E, top_k)
    torch.nn.init.normal_(m.router.weight, std=1.0)  # decisive routing
    return m


@pytest.mark.parametrize("top_k", [1, 2])
def test_tokens_go_to_their_top_k_experts_with_weights_summing_to_one(top_k):
    m = moe(top_k)
    x = torch.randn(40, D)
    probs, experts, weights = m.route(x)
    assert torch.equal(experts, probs.topk(top_k, dim=-1).indices)
    torch.testing.assert_close(weights.sum(-1), torch.ones(40))
    # The output is, token by token, the weighted sum of its chosen experts' outputs.
    ref = torch.stack(
        [
            sum(w * m.experts[e](x[i : i + 1])[0] for w, e in zip(weights[i], experts[i].tolist()))
            for i in range(40)
        ]
    )
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def test_every_expert_with_tokens_learns_and_the_router_too():
    m = moe(top_k=1)
    x = torch.randn(64, D)
    x[:, 0] = x[:, 0].abs() + 1.0
    with torch.no_grad():
        m.router.weight[3] = 0.0
        m.router.weight[3, 0] = -10.0  # expert 3 never wins: its logit is below -10
    m(x).pow(2).sum().backward()
    counts = torch.bincount(m.route(x)[1].flatten(), minlength=E)
    assert counts[3] == 0 and (counts[:3] > 0).all()
    for e, expert in enumerate(m.experts):
        got = sum(p.grad.abs().sum() for p in expert.parameters())
        assert (got > 0) == (e != 3)
    assert m.router.weight.grad.abs().sum() > 0  # from the task loss, even with top-1


def test_balance_loss_is_minimal_for_uniform_routing():
    n = 64
    uniform = torch.full((n, E), 1 / E)
    assert balance_loss(uniform, torch.arange(n)[:, None] % E).item() == pytest.approx(1.0)
    collapsed = torch.zeros(n, E)
    collapsed[:, 0] = 1.0
    assert balance_loss(collapsed, torch.zeros(n, 1, dtype=torch.long)).item() == pytest.approx(E)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # confident routers (one-hot probabilities): E * sum f_i^2 >= 1, equal iff balanced
        experts = torch.randint(E, (n, 1), generator=g)
        probs = torch.nn.functional.one_hot(experts[:, 0], E).float()
        counts = torch.bincount(experts[:, 0], minlength=E)
        value = balance_loss(probs, experts).item()
        assert value >= 1.0 - 1e-6 and (value == pytest.approx(1.0)) == bool((counts == n // E).all())


@pytest.mark.parametrize("top_k", [1, 2])
def test_flops_per_token_are_top_k_ffns_plus_the_router(top_k):
    m, dense = moe(top_k), SwiGLU(D, F_)
    x = torch.randn(50, D)
    with FlopCounterMode(display=False) as moe_flops:
        m(x)
    with FlopCounterMode(display=False) as ffn_flops:
        dense(x)
    router = 2 * 50 * D * E
    assert moe_flops.get_total_flops() == top_k * ffn_flops.get_total_flops() + router


def hybrid(cfg, vocab, **changes):
    torch.manual_seed(0)
    return TransfusionModel(dataclasses.replace(cfg.model, text_moe_experts=E, **changes), vocab)


def test_hybrid_model_puts_experts_in_the_text_tower_only(tok, cfg):
    model = hybrid(cfg, tok.vocab_size)
    for block in model.backbone.blocks:
        assert isinstance(block.ffn["text"], MoEFFN) and isinstance(block.ffn["image"], SwiGLU)
    plain = TransfusionModel(cfg.model, tok.vocab_size)
    experts_and_router = (E - 1) * 3 * cfg.model.dim * cfg.model.hidden_dim + cfg.model.dim * E
    assert model.num_params() - plain.num_params() == cfg.model.n_layers * experts_and_router
    with pytest.raises(ConfigError, match="moe_top_k"):
        cfg.override(["model.text_moe_experts=2", "model.moe_top_k=3"])


def test_objective_adds_the_balance_loss_and_experts_learn(tok, cfg):
    model = hybrid(cfg, tok.vocab_size, moe_top_k=2)
    b = random_batch(tok, seed=0)
    obj = TransfusionObjective(dataclasses.replace(cfg.objective, moe_balance_weight=0.1))
    loss, parts = obj(model, b, torch.Generator().manual_seed(0))
    assert (
        set(parts) == {"loss/text", "loss/image", "loss/moe_balance"} and 0 < parts["loss/moe_balance"] <= E
    )
    expected = (
        parts["loss/text"]
        + cfg.objective.image_loss_weight * parts["loss/image"]
        + 0.1 * parts["loss/moe_balance"]
    )
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    moe0 = model.backbone.blocks[0].ffn["text"]
    assert moe0.router.weight.grad.abs().sum() > 0
    assert (
        sum(any(p.grad is not None and p.grad.abs().sum() > 0 for p in e.parameters()) for e in moe0.experts)
        >= 2
    )


def test_trainer_logs_the_balance_loss(tmp_path):
    cfg = get_recipe("debug").override(
        [
            "model.text_moe_experts=4",
            "train.steps=2",
            "train.log_every=1",
            "train.batch_size=2",
            "train.device=cpu",
        ]
    )
    train(cfg, tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(0 < r["loss/moe_balance"] <= E for r in records)
