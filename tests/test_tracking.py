"""Experiment tracking: the main trainer and the auxiliary ones send the records of metrics.jsonl to
Weights & Biases (here in its offline mode, read back from the run's .wandb file), a resumed run
continues its W&B run, and a missing wandb package is a one-line error before any training."""

import builtins
import json
import struct
import sys
import time

import pytest
import torch
from test_real_data import tiny_fashion
from test_vae import TINY_VAE_ARGS

from motfusion.cli import main
from motfusion.config import TrackingConfig
from motfusion.errors import ConfigError
from motfusion.evaluation.classifier import ClassifierConfig, fit_fashion_classifier
from motfusion.recipes import get_recipe
from motfusion.training.logging import WANDB_ID_FILE, Tracker, read_metrics
from motfusion.training.trainer import train

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="needs wandb (requirements-dev.txt)")

FAST = [
    "train.steps=3",
    "train.batch_size=2",
    "train.seq_len=128",
    "train.log_every=1",
    "train.device=cpu",
    "train.tensorboard=false",
    "train.warmup=0",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing in ~
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_records(path):
    """The protobuf Records of a .wandb file: a 7-byte header, then LevelDB-log chunks in 32 KiB blocks
    (7-byte chunk headers: crc, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4). A chunk still
    being written ends the list."""
    data, pos, records, parts = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0:  # zero padding at the end of a block
            pos += 32768 - pos % 32768
            continue
        if pos + 7 + length > len(data):
            break
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def finished_records(path, timeout_s: float = 30.0):
    """The records of a finished run's .wandb file. W&B's service writes the file on its own after
    `finish()` returns, so wait for the exit record."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout_s} s"
        time.sleep(0.05)


def wandb_runs(run_dir):
    """[(run id, {step: {key: value}}, config keys)] of each offline W&B run under RUN/wandb, oldest first."""
    runs = []
    for path in sorted(
        (run_dir / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime_ns
    ):
        run_id, history, config = None, {}, set()
        for r in finished_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run_id = r.run.run_id
                config |= {item.key for item in r.run.config.update}
            elif kind == "config":
                config |= {item.key for item in r.config.update}
            elif kind == "history":
                items = ((i.key or "/".join(i.nested_key), i.value_json) for i in r.history.item)
                values = {key: json.loads(value) for key, value in items if not key.startswith("_")}
                history.setdefault(r.history.step.num, {}).update(values)
        runs.append((run_id, history, config))
    return runs


def test_train_logs_its_records_to_wandb_and_resume_continues_the_run(tmp_path):
    run = tmp_path / "run"
    cfg = get_recipe("debug").override([*FAST, "train.wandb=true", "train.wandb_project=tests"])
    train(cfg, run)
    [(run_id, history, config)] = wandb_runs(run)
    logged = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert sorted(history) == [1, 2, 3] and run_id == (run / WANDB_ID_FILE).read_text()
    for step, values in history.items():
        assert values["loss"] == pytest.approx(logged[step]["loss"])
        assert values["loss/text"] == pytest.approx(logged[step]["loss/text"])
    assert {"model", "train", "data"} <= config

    cfg = get_recipe("debug").override(
        [*FAST, "train.steps=4", "train.wandb=true", "train.wandb_project=tests"]
    )
    train(cfg, run, resume=True)  # from the step-3 checkpoint
    first, second = wandb_runs(run)
    assert second[0] == run_id and sorted(second[1]) == [4]


def test_a_fresh_run_in_a_used_directory_starts_a_new_wandb_run(tmp_path):
    tracking = TrackingConfig(wandb=True)
    with Tracker(tmp_path, tracking=tracking) as tracker:
        tracker.log({"step": 1, "loss": 1.0})
    with Tracker(tmp_path, tracking=tracking) as tracker:  # start_step 0: not a resume
        tracker.log({"step": 1, "loss": 0.5})
    (a, history_a, _), (b, history_b, _) = wandb_runs(tmp_path)
    assert a != b and history_a == {1: {"loss": 1.0}} and history_b == {1: {"loss": 0.5}}


def test_missing_wandb_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError) as e:
        train(get_recipe("debug").override([*FAST, "train.wandb=true"]), tmp_path / "run")
    assert str(e.value) == "train.wandb needs the wandb package: pip install 'motfusion[wandb]'"
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not any(
        (tmp_path / "run").glob("checkpoints/*")
    )
    tiny_fashion(tmp_path / "fashion")
    capsys.readouterr()
    assert (
        main(
            [
                "train-classifier",
                "--out",
                str(tmp_path / "clf"),
                "--data",
                str(tmp_path / "fashion"),
                "wandb=true",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("wandb needs the wandb package: pip install 'motfusion[wandb]'")
    assert not (tmp_path / "clf" / "metrics.jsonl").exists()


def test_tracking_keys_are_validated():
    with pytest.raises(ConfigError, match="train.wandb_project"):
        get_recipe("debug").override(["train.wandb_project="])
    with pytest.raises(ConfigError, match="^wandb_project='a/b'"):
        ClassifierConfig(wandb_project="a/b").validate()


def test_an_auxiliary_trainer_writes_metrics_jsonl_and_logs_to_wandb(tmp_path):
    tiny_fashion(tmp_path / "fashion", n_train=16, n_test=4)
    out = tmp_path / "classifier"
    cfg = ClassifierConfig(steps=3, batch_size=4, width=4, feature_dim=8, wandb=True, wandb_run="clf")
    fit_fashion_classifier(cfg, out, root=tmp_path / "fashion", log=lambda line: None)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [3]  # log_every=100: the last step only
    assert {"loss", "grad_norm", "lr", "dt_ms"} <= set(records[0]) and torch.isfinite(
        torch.tensor(records[0]["loss"])
    )
    [(_, history, config)] = wandb_runs(out)
    assert history[3]["loss"] == pytest.approx(records[0]["loss"]) and {"steps", "width"} <= config
    assert (out / "weights.safetensors").is_file()


def test_an_auxiliary_trainer_without_tracking_writes_only_metrics_jsonl(tmp_path):
    assert main(["train-vae", "--dataset", "shapes", "--out", str(tmp_path / "vae"), *TINY_VAE_ARGS]) == 0
    records = read_metrics(tmp_path / "vae" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 2] and "val_psnr" in records[-1]
    assert not (tmp_path / "vae" / "wandb").exists() and not list(
        (tmp_path / "vae").glob("events.out.tfevents.*")
    )
