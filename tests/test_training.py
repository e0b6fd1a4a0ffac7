"""Training: overfitting, exact resume, checkpoint round trips and atomicity, rank sharding, the CLI."""

import json
import shutil
from dataclasses import dataclass

import pytest
import torch

from motfusion.cli import main
from motfusion.data.documents import document_for, document_rng
from motfusion.data.pipeline import DocumentStream, build_dataset, make_packer
from motfusion.errors import NonFiniteLossError
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.recipes import get_recipe
from motfusion.sequence import Image, Text
from motfusion.training import checkpoint as ckpt_module
from motfusion.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_model,
    save_checkpoint,
    step_dir,
)
from motfusion.training.logging import read_metrics
from motfusion.training.trainer import (
    build_optimizer,
    lr_at,
    param_groups,
    train,
    train_step,
)

SMALL = ["train.batch_size=2", "train.seq_len=128", "train.log_every=1", "train.device=cpu"]


def small_cfg(*overrides: str):
    return get_recipe("debug").override([*SMALL, *overrides])


def losses(run_dir) -> list[tuple[int, float, float, float]]:
    return [
        (r["step"], r["loss"], r["loss/text"], r["grad_norm"])
        for r in read_metrics(run_dir / "metrics.jsonl")
    ]


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    t = small_cfg("train.steps=50", "train.warmup=10", "train.lr=1e-3", "train.min_lr=1e-4").train
    lrs = [lr_at(s, t) for s in range(1, 51)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4)


def test_weight_decay_only_on_weight_matrices(tok):
    model = TransfusionModel(small_cfg().model, tok.vocab_size)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.ndim == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert any(p is model.text.embed.weight for p in no_decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"] if p is not model.text.embed.weight)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_overfits_a_fixed_batch(tok):
    cfg = small_cfg("train.lr=3e-3", "train.weight_decay=0")
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size)
    optimizer, objective = build_optimizer(model, cfg.train), TransfusionObjective(cfg.objective)
    batch = make_packer(cfg, tok).next_batch()
    # Same noise and timesteps every step: the objective is a fixed function of the weights.
    history = [
        train_step(model, objective, optimizer, batch, torch.Generator().manual_seed(0), 3e-3, 1.0)
        for _ in range(25)
    ]
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert history[-1]["loss/text"] < 0.6 * history[0]["loss/text"]
    assert history[-1]["loss/image"] < history[0]["loss/image"]


def test_non_finite_loss_raises_without_stepping(tok):
    cfg = small_cfg()
    model = TransfusionModel(cfg.model, tok.vocab_size)
    optimizer = build_optimizer(model, cfg.train)
    with torch.no_grad():
        model.text.embed.weight[:] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match="train.lr"):
        train_step(
            model,
            TransfusionObjective(cfg.objective),
            optimizer,
            make_packer(cfg, tok).next_batch(),
            torch.Generator().manual_seed(0),
            1e-3,
            1.0,
        )
    for a, b in zip(before, model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_resume_after_crash_is_exact(tmp_path):
    """2N steps straight == N steps, crash, resume from the step-N checkpoint, N more."""
    cfg = small_cfg("train.steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=0")
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(cfg, straight)
    train(cfg, crashed)
    shutil.rmtree(step_dir(crashed, 8))  # the run "died" after step 8 was logged but before it was saved
    result = train(cfg, crashed, resume=True)
    assert result.step == 8 and [r["step"] for r in result.metrics] == [5, 6, 7, 8]
    assert losses(crashed) == losses(straight)
    assert [r["step"] for r in read_metrics(crashed / "metrics.jsonl")] == list(range(1, 9))


def test_resume_with_more_steps_is_exact(tmp_path):
    """N steps, then resume with train.steps=2N, == 2N straight (constant LR so both schedules agree)."""
    const = ["train.warmup=0", "train.min_lr=1e-3", "train.lr=1e-3"]
    train(small_cfg("train.steps=8", *const), tmp_path / "straight")
    train(small_cfg("train.steps=4", *const), tmp_path / "resumed")
    train(small_cfg("train.steps=8", *const), tmp_path / "resumed", resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_checkpoint_round_trip(tmp_path, tok):
    cfg = small_cfg()
    torch.manual_seed(1)
    model = TransfusionModel(cfg.model, tok.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the zero-initialized image head too
    save_checkpoint(tmp_path, 3, model, cfg, {"step": 3})
    loaded, loaded_cfg, loaded_tok = load_model(tmp_path)  # a run directory resolves to its latest checkpoint
    assert loaded_cfg.to_dict() == cfg.to_dict() and loaded_tok.vocab_size == tok.vocab_size
    batch = make_packer(cfg, tok).next_batch()
    t = torch.full((batch.images.shape[0],), 500)
    with torch.no_grad():
        a, b = model.eval()(batch, batch.images, t), loaded(batch, batch.images, t)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.image, b.image)


def test_checkpoint_write_is_atomic(tmp_path, tok, monkeypatch):
    cfg = small_cfg()
    model = TransfusionModel(cfg.model, tok.vocab_size)
    first = save_checkpoint(tmp_path, 1, model, cfg, {"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module.torch, "save", crash)  # dies after the weights were written
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, cfg, {"step": 2})
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [first.name]


def test_keep_checkpoints_prunes_old_ones(tmp_path, tok):
    cfg = small_cfg()
    model = TransfusionModel(cfg.model, tok.vocab_size)
    (tmp_path / "checkpoints" / ".tmp-step_00000009-1").mkdir(parents=True)  # left by a crashed writer
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, cfg, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]


def _doc_key(enc) -> tuple:
    return tuple(enc.tokens), tuple(x.numpy().tobytes() for x in enc.images)


@dataclass
class FakeSample:
    image: torch.Tensor
    caption: str


def test_document_mix_follows_the_config():
    cfg = small_cfg()
    sample = FakeSample(torch.zeros(3, 16, 16), "a red circle")
    n = 4000
    layouts = [
        tuple(type(s) for s in document_for(sample, document_rng(0, "train", i), cfg.data, cfg.objective))
        for i in range(n)
    ]
    kept, dropped, image_first = (layouts.count(k) for k in ((Text, Image), (Image,), (Image, Text)))
    assert kept + dropped + image_first == n
    assert (kept + dropped) / n == pytest.approx(cfg.data.caption_first_prob, abs=0.03)
    assert dropped / (kept + dropped) == pytest.approx(cfg.objective.cfg_dropout, abs=0.03)


def test_documents_are_a_pure_function_of_the_index(tok):
    cfg = small_cfg()
    a = DocumentStream(build_dataset(cfg, "train"), tok, cfg, "train")
    b = DocumentStream(build_dataset(cfg, "train"), tok, cfg, "train")
    assert [_doc_key(a(i)) for i in (5, 3, 5, 0)] == [_doc_key(b(i)) for i in (5, 3, 5, 0)]
    other_seed = small_cfg("train.seed=1")
    c = DocumentStream(build_dataset(other_seed, "train"), tok, other_seed, "train")
    assert [_doc_key(a(i)) for i in range(4)] != [_doc_key(c(i)) for i in range(4)]


def test_cli_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "debug", "--out", str(out), "--steps", "3", *SMALL]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["steps"] == 3 and config["recipe"] == "debug"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step_00000003"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "train_state.pt", "config.json"}
    assert "step 3/3 | loss" in capsys.readouterr().out
    assert (
        main(["train", "--out", str(out), "--resume", "--steps", "4"]) == 0
    )  # the run's own config, extended
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 4


@pytest.mark.parametrize(
    "override, key", [("model.untie=bogus", "model.untie"), ("train.nope=1", "train.nope")]
)
def test_cli_bad_override_is_one_clear_line(tmp_path, capsys, override, key):
    assert main(["train", "--recipe", "debug", "--out", str(tmp_path / "run"), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("motfusion: error:") and key in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_refuses_to_overwrite_or_resume_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", "--recipe", "debug", "--out", str(out), "--steps", "1", *SMALL]) == 0
    assert main(["train", "--recipe", "debug", "--out", str(out), "--steps", "1", *SMALL]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (
        main(["train", "--recipe", "debug", "--out", str(out), "--resume", "model.dim=32", "model.n_heads=2"])
        == 2
    )
    assert "model.dim: 64 -> 32" in capsys.readouterr().err


def test_cli_config_and_recipes(capsys):
    assert main(["config", "--recipe", "debug", "train.steps=7"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["steps"] == 7
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "debug" in listing and "demo" in listing and "7b" in listing
