"""The weights' moving average (train.ema): the update, checkpoints, exact resume, sampling's default."""

import shutil

import pytest
import safetensors.torch
import torch

from motfusion.data.pipeline import make_packer
from motfusion.errors import ConfigError
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.recipes import get_recipe
from motfusion.tokenizer import ByteTokenizer
from motfusion.training.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    WEIGHTS_METADATA,
    export_checkpoint,
    load_model,
    step_dir,
)
from motfusion.training.ema import EMA, ema_decay
from motfusion.training.trainer import build_optimizer, train, train_step

SMALL = [
    "train.batch_size=2",
    "train.seq_len=128",
    "train.log_every=1",
    "train.device=cpu",
    "train.tensorboard=false",
    "train.ema=0.9",
]


def small_cfg(*overrides: str):
    return get_recipe("debug").override([*SMALL, *overrides])


def test_decay_warms_up_to_train_ema():
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 100) == pytest.approx(101 / 110)
    assert ema_decay(0.999, 100_000) == 0.999
    assert ema_decay(0.999, 1, warmup=2) == pytest.approx(2 / 3)
    assert ema_decay(0.995, 398, warmup=2) == 0.995


def test_the_default_warm_up_rules_a_short_run():
    """With train.ema_warmup 10 the warm-up, not train.ema, sets the decay of a 1,400-step run
    (make demo's) for any train.ema of 0.9937 or more: 0.995 and 0.998 average alike."""
    assert all(ema_decay(0.995, s) == ema_decay(0.998, s) for s in range(1, 1401))
    assert ema_decay(0.995, 1400, warmup=2) == 0.995 != ema_decay(0.998, 1400, warmup=2)


def test_update_matches_a_hand_computation():
    """Three real optimizer steps; the average is d_s * avg + (1 - d_s) * weights after each step s."""
    cfg = small_cfg()
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size)
    ema, optimizer = EMA(model, 0.9), build_optimizer(model, cfg.train)
    packer, objective = make_packer(cfg, tok), TransfusionObjective(cfg.objective)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for step in (1, 2, 3):
        train_step(
            model, objective, optimizer, packer.next_batch(), torch.Generator().manual_seed(step), 1e-2, 1.0
        )
        ema.update(step)
        d = min(0.9, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v
    moved = 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[k], expected[k], rtol=1e-6, atol=1e-7)  # lerp rounds
        moved += not torch.equal(ema.state_dict()[k], v)
    assert moved > len(expected) // 2  # the average is not the weights


def test_resume_with_ema_is_bitwise_exact(tmp_path):
    """2N steps straight == N steps, crash, resume: the same losses and the same average, bit for bit."""
    cfg = small_cfg("train.steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=0")
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(cfg, straight)
    train(cfg, crashed)
    shutil.rmtree(step_dir(crashed, 6))
    train(cfg, crashed, resume=True)
    a = safetensors.torch.load_file(step_dir(straight, 6) / EMA_FILE)
    b = safetensors.torch.load_file(step_dir(crashed, 6) / EMA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    raw = safetensors.torch.load_file(step_dir(straight, 6) / MODEL_FILE)
    assert any(not torch.equal(a[k], raw[k]) for k in a)


def test_sampling_reads_the_average_and_raw_weights_on_request(tmp_path):
    cfg = small_cfg("train.steps=3")
    train(cfg, tmp_path / "run")
    ckpt = step_dir(tmp_path / "run", 3)
    average = safetensors.torch.load_file(ckpt / EMA_FILE)
    raw = safetensors.torch.load_file(ckpt / MODEL_FILE)
    for ema, expected in ((True, average), (False, raw)):
        weights = load_model(tmp_path / "run", ema=ema)[0].state_dict()
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
    out = export_checkpoint(tmp_path / "run", tmp_path / "export" / "model.safetensors")
    with safetensors.safe_open(out, framework="pt") as f:
        assert f.metadata()[WEIGHTS_METADATA] == "ema"
    exported = load_model(out)[0].state_dict()
    assert all(torch.equal(exported[k], average[k]) for k in average)


@pytest.mark.parametrize("warmup", [10, 2])
def test_resuming_a_run_without_average_starts_it_from_the_weights(tmp_path, warmup):
    train(small_cfg("train.steps=2", "train.ema=0"), tmp_path / "run")
    result = train(small_cfg("train.steps=3", f"train.ema_warmup={warmup}"), tmp_path / "run", resume=True)
    assert result.step == 3 and (step_dir(tmp_path / "run", 3) / EMA_FILE).is_file()
    two = safetensors.torch.load_file(step_dir(tmp_path / "run", 2) / MODEL_FILE)
    three = safetensors.torch.load_file(step_dir(tmp_path / "run", 3) / MODEL_FILE)
    average = safetensors.torch.load_file(step_dir(tmp_path / "run", 3) / EMA_FILE)
    d = ema_decay(0.9, 3, warmup)
    for k in average:  # one update from the resumed weights, not from the initialisation
        torch.testing.assert_close(average[k], d * two[k] + (1 - d) * three[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("value", ["1", "-0.1", "1.5"])
def test_ema_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match="train.ema"):
        small_cfg(f"train.ema={value}")


@pytest.mark.parametrize("value", ["1", "0.5"])
def test_ema_warmup_of_one_or_less_is_a_config_error(value):
    with pytest.raises(ConfigError, match="train.ema_warmup"):
        small_cfg(f"train.ema_warmup={value}")


def test_cli_samples_the_average_unless_asked_for_raw_weights(tmp_path, capsys):
    """`generate` and `export` use the average by default; --raw-weights gives the trained weights."""
    from motfusion.cli import main

    train(small_cfg("train.steps=3"), tmp_path / "run")
    outs = {}
    for flag in ([], ["--raw-weights"]):
        out = tmp_path / f"samples{len(flag)}"
        assert (
            main(
                [
                    "generate",
                    "--ckpt",
                    str(tmp_path / "run"),
                    "--prompt",
                    "a red circle",
                    "--out",
                    str(out),
                    "--steps",
                    "4",
                    *flag,
                ]
            )
            == 0
        )
        outs[len(flag)] = sorted(out.iterdir())[0].read_bytes()
        export = tmp_path / f"export{len(flag)}" / "model.safetensors"
        assert main(["export", "--ckpt", str(tmp_path / "run"), "--out", str(export), *flag]) == 0
        with safetensors.safe_open(export, framework="pt") as f:
            assert f.metadata()[WEIGHTS_METADATA] == ("raw" if flag else "ema")
    assert outs[0] != outs[1]
