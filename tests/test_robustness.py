"""Crash safety: SIGKILL/SIGTERM/SIGINT then resume == uninterrupted, skipped non-finite steps,
exported checkpoints, and clear errors for checkpoints that do not fit."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors
import torch

from motfusion.cli import main
from motfusion.data.pipeline import make_packer
from motfusion.errors import CheckpointError, NonFiniteLossError
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.recipes import get_recipe
from motfusion.training import trainer
from motfusion.training.checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_model,
    load_train_state,
    load_weights,
    save_checkpoint,
    weights_mismatch,
)
from motfusion.training.logging import TrainLogger, read_metrics
from motfusion.training.trainer import build_optimizer, train, train_step

# A constant LR, so that a run started for more steps follows the same schedule as a shorter one.
SMALL = [
    "train.batch_size=2",
    "train.seq_len=128",
    "train.log_every=1",
    "train.device=cpu",
    "train.warmup=0",
    "train.lr=1e-3",
    "train.min_lr=1e-3",
    "train.tensorboard=false",
]
COMPARED = ("step", "loss", "loss/text", "loss/image", "grad_norm", "flops", "cumulative_flops")


def small_cfg(*overrides: str):
    return get_recipe("debug").override([*SMALL, *overrides])


def curve(run_dir) -> list[tuple]:
    return [tuple(r[k] for k in COMPARED) for r in read_metrics(run_dir / "metrics.jsonl")]


def logged_step(run_dir) -> int:
    records = read_metrics(run_dir / "metrics.jsonl")
    return records[-1]["step"] if records else 0


# ---- signals -----------------------------------------------------------------------------------


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    """Kill -9 a real training process at whatever it is doing; resuming continues exactly."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    overrides = [*SMALL, "train.checkpoint_every=3"]
    train(small_cfg("train.steps=12", "train.checkpoint_every=3"), straight)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same kernels as this process
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "motfusion",
            "train",
            "--recipe",
            "debug",
            "--out",
            str(killed),
            "--steps",
            "1000",
            *overrides,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while logged_step(killed) < 7 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    assert 7 <= logged_step(killed) < 1000
    resumed_from = checkpoint_step(latest_checkpoint(killed))
    result = train(small_cfg("train.steps=12", "train.checkpoint_every=3"), killed, resume=True)
    assert result.metrics[0]["step"] == resumed_from + 1
    assert curve(killed) == curve(straight)  # records after the checkpoint were dropped, then redone


def _signal_at_step(monkeypatch, sig: signal.Signals, at: int) -> None:
    """Deliver `sig` to this process while step `at` is being computed."""
    real = trainer.lr_at

    def lr_at(step, tcfg):
        if step == at:
            signal.raise_signal(sig)
        return real(step, tcfg)

    monkeypatch.setattr(trainer, "lr_at", lr_at)


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_checkpoints_the_step_then_resume_matches(tmp_path, monkeypatch, capsys, sig, status):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(small_cfg("train.steps=6"), straight)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    _signal_at_step(monkeypatch, sig, at=3)
    args = ["train", "--recipe", "debug", "--out", str(stopped), "--steps", "6", *SMALL]
    assert main(args) == status
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored
    out = capsys.readouterr().out
    assert (
        f"{sig.name}: stopped after step 3/6, checkpoint {stopped / 'checkpoints' / 'step_00000003'}" in out
    )
    assert latest_checkpoint(stopped).name == "step_00000003" and logged_step(stopped) == 3
    monkeypatch.undo()
    assert main(["train", "--out", str(stopped), "--resume"]) == 0
    assert curve(stopped) == curve(straight)


def test_a_second_signal_interrupts_at_once(tmp_path, monkeypatch):
    """Ctrl-C twice: the second one is not deferred (e.g. when the checkpoint write hangs)."""
    real = trainer.lr_at

    def lr_at(step, tcfg):
        if step == 2:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(step, tcfg)

    monkeypatch.setattr(trainer, "lr_at", lr_at)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg("train.steps=4"), tmp_path / "run")
    assert signal.getsignal(signal.SIGINT) is before  # the handler from before the run is back


def test_a_second_ctrl_c_interrupts_even_if_sigint_was_ignored(tmp_path, monkeypatch):
    """A library that left SIGINT ignored must not swallow the second Ctrl-C (seen once in CI)."""
    real = trainer.lr_at

    def lr_at(step, tcfg):
        if step == 2:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(step, tcfg)

    monkeypatch.setattr(trainer, "lr_at", lr_at)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(small_cfg("train.steps=4"), tmp_path / "run")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_logger_drops_records_after_the_resume_step_and_a_torn_last_line(tmp_path):
    lines = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 9))
    (tmp_path / "metrics.jsonl").write_text(lines + '{"step": 9, "lo')  # killed in the middle of a write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 9))
    TrainLogger(tmp_path, total_steps=10, start_step=4).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (tmp_path / "metrics.jsonl").read_text() == lines[: lines.index('{"step": 5')]


# ---- non-finite steps --------------------------------------------------------------------------


def _nan_objective(monkeypatch, bad_calls: set[int] | None, seen: list[list[torch.Tensor]]):
    """The objective returns a NaN loss on the given calls (1-based; None: from the 2nd on), after
    recording the weights it was called with."""
    real = TransfusionObjective.__call__
    calls = [0]

    def call(self, model, batch, generator=None, whole=None):
        calls[0] += 1
        seen.append([p.detach().clone() for p in model.parameters()])
        loss, parts = real(self, model, batch, generator, whole)
        bad = calls[0] >= 2 if bad_calls is None else calls[0] in bad_calls
        return (loss * float("nan"), parts) if bad else (loss, parts)

    monkeypatch.setattr(TransfusionObjective, "__call__", call)


def test_non_finite_step_is_skipped_and_logged(tmp_path, monkeypatch, capsys):
    seen = []
    _nan_objective(monkeypatch, {3}, seen)
    run = tmp_path / "run"
    train(small_cfg("train.steps=5", "train.log_every=4"), run)
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))  # step 3 did not move the weights
    assert not all(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))  # step 2 did
    records = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert sorted(records) == [3, 4, 5]  # the skipped step is logged whatever train.log_every says
    assert (
        records[3]["skipped"] == 1
        and records[3]["bad_steps"] == 1
        and records[3]["loss"] != records[3]["loss"]
    )
    assert records[4]["skipped"] == 0 and records[4]["bad_steps"] == 0
    assert (
        "step 3: skipped, 1 in a row (train.max_bad_steps=5): non-finite loss nan" in capsys.readouterr().out
    )
    adam = load_train_state(latest_checkpoint(run))["optimizer"]["state"]
    assert {int(s["step"]) for s in adam.values()} == {4}  # 5 steps, one of them not applied


def test_skipped_step_zeroes_the_gradients(tok):
    cfg = small_cfg()
    model = TransfusionModel(cfg.model, tok.vocab_size)
    optimizer = build_optimizer(model, cfg.train)
    with torch.no_grad():
        model.text.head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError) as info:
        train_step(
            model,
            TransfusionObjective(cfg.objective),
            optimizer,
            make_packer(cfg, tok).next_batch(),
            torch.Generator().manual_seed(0),
            1e-3,
            1.0,
        )
    assert all(p.grad is None for p in model.parameters())
    assert set(info.value.stats) == {"loss", "loss/text", "loss/image", "grad_norm"}


def test_max_bad_steps_in_a_row_stop_the_cli_with_one_line(tmp_path, monkeypatch, capsys):
    _nan_objective(monkeypatch, None, [])
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--recipe",
                "debug",
                "--out",
                str(run),
                "--steps",
                "10",
                *SMALL,
                "train.max_bad_steps=3",
                "train.checkpoint_every=1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        "motfusion: error: stopped at step 4: 3 steps in a row had a non-finite loss or gradient "
        "(train.max_bad_steps)"
    )
    assert (
        f"--resume from {run / 'checkpoints' / 'step_00000003'}" in err
    )  # the last checkpoint, before the streak ended
    assert [(r["step"], r["bad_steps"]) for r in read_metrics(run / "metrics.jsonl")] == [
        (1, 0),
        (2, 1),
        (3, 2),
        (4, 3),
    ]


# ---- checkpoints -------------------------------------------------------------------------------


@pytest.fixture
def trained(tmp_path):
    run = tmp_path / "run"
    train(small_cfg("train.steps=2"), run)
    return run


def test_export_is_one_file_that_loads_like_the_checkpoint(trained, tmp_path, capsys, tok):
    out = tmp_path / "share" / "motfusion-debug.safetensors"
    assert main(["export", "--ckpt", str(trained), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.json", out.name]
    with safetensors.safe_open(out, framework="pt") as f:
        config = json.loads(f.metadata()["motfusion_config"])
    assert (
        config
        == json.loads((out.parent / "config.json").read_text())
        == json.loads((trained / "config.json").read_text())
    )
    a, cfg, _ = load_model(trained)
    b, cfg_b, _ = load_model(out)
    assert cfg_b.to_dict() == cfg.to_dict()
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_export_errors_name_what_to_fix(trained, tmp_path, capsys):
    assert main(["export", "--ckpt", str(trained), "--out", str(tmp_path / "model.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}\n")  # another model's export lives here
    assert main(["export", "--ckpt", str(trained), "--out", str(tmp_path / "model.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("motfusion: error:") and "holds another model's config" in err
    assert not (tmp_path / "model.safetensors").exists()


def test_weights_of_another_config_list_tensors_and_config_keys(trained, tok):
    other = small_cfg("model.dim=32", "model.n_heads=2", "model.untie=ffn")
    model, ckpt = TransfusionModel(other.model, tok.vocab_size), latest_checkpoint(trained)
    problems = weights_mismatch(model, ckpt / "model.safetensors")
    assert "text.embed.weight (272, 64) in the file, (272, 32) in the model" in problems
    assert "backbone.blocks.0.wqkv.image.weight not in the model" in problems  # attn is tied in `other`
    assert "backbone.blocks.0.wqkv.shared.weight missing from the file" in problems
    with pytest.raises(CheckpointError) as info:
        load_weights(model, ckpt)
    message = str(info.value)
    assert "\n" not in message and f"{len(problems)} tensor(s) differ: {problems[0]}; " in message
    assert (
        "model.dim 64 in the file, 32 in the model" in message
        and "model.n_heads 4 in the file, 2 in the model" in message
    )
    assert "model.untie ('ffn', 'attn', 'norm') in the file, ('ffn',) in the model" in message


def test_train_state_never_unpickles_code(tmp_path, tok):
    cfg = small_cfg()
    ckpt = save_checkpoint(tmp_path, 1, TransfusionModel(cfg.model, tok.vocab_size), cfg, {"step": 1})
    torch.save({"step": 1, "payload": Payload()}, ckpt / "train_state.pt")
    with pytest.raises(CheckpointError, match="train_state.pt"):
        load_train_state(ckpt)


class Payload:
    """An arbitrary object: torch.load(weights_only=True) must refuse to rebuild it."""
