"""Observability: FLOPs per modality against a hand count, the mask, and torch's own counter; the
FLOPs and rates in metrics.jsonl; MFU's peak table; TensorBoard events; the plot command."""

import shutil

import pytest
import torch
from conftest import random_batch
from PIL import Image as PILImage
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.flop_counter import FlopCounterMode

from motfusion.cli import main
from motfusion.models.attention import SeqMeta, dense_mask
from motfusion.models.transfusion import TransfusionModel, build_patcher
from motfusion.recipes import get_recipe
from motfusion.sequence import Image, Text, pack_documents
from motfusion.training import flops as flops_module
from motfusion.training.checkpoint import step_dir
from motfusion.training.flops import (
    FlopCounter,
    patcher_flops,
    peak_flops,
    visible_keys,
)
from motfusion.training.logging import read_metrics
from motfusion.training.trainer import train

SMALL = ["train.batch_size=2", "train.seq_len=128", "train.log_every=1", "train.device=cpu"]


def two_documents(tok, patch_size: int = 4):
    """BOS a b BOI [16 patches] EOI EOS (22 positions), then BOS BOI [16 patches] EOI c EOS (21), in 48."""
    image = lambda: Image(torch.zeros(3, 16, 16))
    return pack_documents([[Text("ab"), image()], [image(), Text("c")]], tok, patch_size, seq_len=48)


@pytest.mark.parametrize("image_attention", ["bidirectional", "causal"])
def test_flops_of_the_debug_model_match_a_hand_count(tok, image_attention):
    cfg = get_recipe("debug").override([f"model.image_attention={image_attention}"])
    counted = FlopCounter(TransfusionModel(cfg.model, tok.vocab_size)).count(two_documents(tok))
    D, F, V, L = 64, 192, tok.vocab_size, 16  # dim, SwiGLU hidden (8/3 * 64 rounded up to 64), vocab, patches
    # Per layer, one tower: two norms, wqkv, wo, SwiGLU (w1, w2, w3), q and k norms of head_dim 16.
    layer = 2 * D + 3 * D * D + D * D + 3 * D * F + 2 * 16
    n = 2 * layer + D  # two layers and the final norm: what a token of either modality computes with
    # Keys per query, causal: 1 + its index in the document. Text at 0,1,2,3,20,21 and 0,1,18,19,20;
    # patches at 4..19 and 2..17, plus the later patches of their image when bidirectional (16 * 15 / 2).
    text_keys = (1 + 2 + 3 + 4 + 21 + 22) + (1 + 2 + 19 + 20 + 21)
    image_keys = (
        sum(range(5, 21)) + sum(range(3, 19)) + (2 * 120 if image_attention == "bidirectional" else 0)
    )
    lm_targets = 4 + 3  # BOS, a, b (-> BOI), EOI (-> EOS); BOS (-> BOI), EOI (-> c), c (-> EOS)
    patcher = 2 * (L * 48 * D + 256 * D + D * D + L * D * 48)  # proj_in, timestep MLP, proj_out; forward
    attention = 12 * 2 * D  # per key, over two layers
    assert {m: n for m, n in counted.tokens.items() if n} == {"text": 11, "image": 32}  # not the 5 of padding
    assert counted.flops["text"] == 6 * n * 11 + attention * text_keys + 6 * V * D * lm_targets
    assert counted.flops["image"] == 6 * n * 32 + attention * image_keys + 3 * patcher * 2
    assert counted.per_token() == {m: counted.flops[m] / counted.tokens[m] for m in ("text", "image")}


def test_a_mixture_of_experts_counts_its_router_and_top_k_experts(tok):
    batch = two_documents(tok)
    dense = FlopCounter(TransfusionModel(get_recipe("debug").model, tok.vocab_size)).count(batch)
    for top_k in (1, 2):
        cfg = get_recipe("debug").override(["model.text_moe_experts=4", f"model.moe_top_k={top_k}"])
        moe = FlopCounter(TransfusionModel(cfg.model, tok.vocab_size)).count(batch)
        router, ffn = 64 * 4, 3 * 64 * 192  # per layer
        extra = 2 * (router + (top_k - 1) * ffn)  # over two layers, per text token
        assert moe.flops["text"] == dense.flops["text"] + 6 * extra * 11
        assert moe.flops["image"] == dense.flops["image"]  # the image tower keeps its dense FFN


def test_mot_has_the_flops_per_token_of_the_dense_model(tok):
    """Untying gives each tower its own weights, not more work per token (the MoT paper's premise)."""
    batch = random_batch(tok, seed=3, image_size=8, patch_size=4)
    counts = {}
    for untie in ("ffn,attn,norm", "ffn", ""):
        model = TransfusionModel(get_recipe("debug").override([f"model.untie={untie}"]).model, tok.vocab_size)
        counts[untie] = (model.num_params(), FlopCounter(model).count(batch).flops)
    assert counts["ffn,attn,norm"][0] > counts["ffn"][0] > counts[""][0]
    assert counts["ffn,attn,norm"][1] == counts["ffn"][1] == counts[""][1]


@pytest.mark.parametrize("bidirectional", [True, False])
def test_visible_keys_are_the_row_sums_of_the_attention_mask(tok, bidirectional):
    batch = random_batch(tok, seed=1, rows=3, seq_len=160, image_size=8, patch_size=4)
    B, T = batch.shape
    index = torch.arange(T).expand(B, T)
    meta = SeqMeta(batch.doc, batch.image, index)
    mask = dense_mask(meta, meta, bidirectional)[:, 0]  # (B, T, T)
    real = batch.doc >= 0
    assert torch.equal(visible_keys(batch, bidirectional)[real], mask.sum(-1)[real])


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_patcher_flops_agree_with_torch_flop_counter(patcher):
    cfg = get_recipe("debug").override([f"model.patcher={patcher}"]).model
    with torch.random.fork_rng(devices=[]):
        module = build_patcher(cfg)
    x_t, t = torch.zeros(1, 3, 16, 16), torch.zeros(1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tokens, skips = module.embed(x_t, t)
        module.predict(tokens, 16, 16, skips)
    assert patcher_flops(cfg, 3, 16, 16) == counter.get_total_flops() > 0


def test_metrics_carry_flops_and_rates_and_resume_continues_the_sum(tmp_path, tok):
    cfg = get_recipe("debug").override(
        [*SMALL, "train.steps=4", "train.checkpoint_every=2", "train.tensorboard=false"]
    )
    run = tmp_path / "run"
    train(cfg, run)
    records = read_metrics(run / "metrics.jsonl")
    total = 0.0
    for r in records:
        total += r["flops"]
        assert r["cumulative_flops"] == pytest.approx(total, rel=1e-12)
        assert r["flops"] == pytest.approx(
            sum(r[f"tokens/{m}"] * r[f"flops_per_token/{m}"] for m in ("text", "image"))
        )
        for m in ("text", "image"):
            assert r[f"tokens_per_s/{m}"] == pytest.approx(r[f"tokens/{m}"] / (r["dt_ms"] / 1000))
        assert "mfu" not in r  # CPU: no peak to compare with
    shutil.rmtree(step_dir(run, 4))
    train(cfg, run, resume=True)
    again = read_metrics(run / "metrics.jsonl")
    assert [r["cumulative_flops"] for r in again] == [r["cumulative_flops"] for r in records]


def test_peak_flops_table(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    for name, peak in [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla T4", None),
    ]:
        monkeypatch.setattr(flops_module.torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops(torch.device("cuda", 0)) == peak


def test_tensorboard_events_mirror_metrics_and_resume_hides_redone_steps(tmp_path):
    cfg = get_recipe("debug").override([*SMALL, "train.steps=4", "train.checkpoint_every=2"])
    run = tmp_path / "run"
    train(cfg, run)
    shutil.rmtree(step_dir(run, 4))  # died after logging steps 3 and 4, before checkpointing step 4
    train(cfg, run, resume=True)
    events = EventAccumulator(str(run))
    events.Reload()
    records = read_metrics(run / "metrics.jsonl")
    for key in ("loss/text", "loss/image", "cumulative_flops", "tokens_per_s/image"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3, 4]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_plot_draws_runs_against_steps_and_flops(tmp_path, capsys):
    runs = []
    for name, untie in (("mot", "ffn,attn,norm"), ("dense", "")):
        cfg = get_recipe("debug").override(
            [*SMALL, "train.steps=3", f"model.untie={untie}", "train.tensorboard=false"]
        )
        train(cfg, tmp_path / name)
        runs.append(str(tmp_path / name))
    with open(tmp_path / "mot" / "metrics.jsonl", "a") as f:  # a skipped step: NaN losses are left out
        f.write('{"step": 4, "loss/text": NaN, "loss/image": NaN, "cumulative_flops": 1e9}\n')
    out = tmp_path / "plots" / "compare.png"
    assert main(["plot", *runs, "--out", str(out)]) == 0
    assert "loss/text, loss/image against steps and training FLOPs" in capsys.readouterr().out
    width, height = PILImage.open(out).size
    assert (width, height) == (
        2 * 5 * 110,
        2 * round(3.6 * 110),
    )  # a 2 x 2 grid: steps and FLOPs, two modalities
    assert main(["plot", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
