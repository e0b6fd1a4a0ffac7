"""Checkpoints: atomic, self-describing directories under RUN/checkpoints/step_XXXXXXXX/.

Each holds `model.safetensors` (the weights), `train_state.pt` (optimizer, step, RNG and packer
state: tensors and plain containers only, so it loads with `torch.load(weights_only=True)`) and
`config.json` (the full config, enough to rebuild the model for sampling).

A checkpoint is written into a temporary sibling directory, every file is fsynced, and the
directory is renamed into place, so a crash never leaves a partial checkpoint under a final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from motfusion.config import Config, ConfigError
from motfusion.models.transfusion import TransfusionModel
from motfusion.tokenizer import Tokenizer, build_tokenizer

CHECKPOINTS = "checkpoints"
MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "train_state.pt", "config.json"
_STEP_DIR = re.compile(r"step_(\d{8})")
_TMP_PREFIX = ".tmp-"


class CheckpointError(Exception):
    """A missing, partial or incompatible checkpoint; the message names the path."""


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are not listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(ckpt: Path) -> int:
    match = _STEP_DIR.fullmatch(Path(ckpt).name)
    if match is None:
        raise CheckpointError(f"{ckpt} is not a checkpoint directory (expected .../step_XXXXXXXX)")
    return int(match.group(1))


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(tmp: Path, model: torch.nn.Module, cfg: Config, train_state: dict[str, Any]) -> None:
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(weights, tmp / MODEL_FILE)
    torch.save(train_state, tmp / STATE_FILE)
    write_json(tmp / CONFIG_FILE, cfg.to_dict())
    for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE):
        _fsync(tmp / name)
    _fsync(tmp)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, cfg: Config,
                    train_state: dict[str, Any], keep: int = 0) -> Path:
    """Write checkpoint `step` atomically, then keep only the newest `keep` (0: keep all)."""
    final = step_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_files(tmp, model, cfg, train_state)
        if final.exists():  # the same step written again (e.g. a run redone): replace it whole
            stale = final.parent / f"{_TMP_PREFIX}{final.name}-old-{os.getpid()}"
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (0 keeps all), and leftovers of crashed writes.

    A run has one writer, so any temporary directory still here belongs to a write that died."""
    for leftover in (Path(run_dir) / CHECKPOINTS).glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)


def _require(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    return path


def load_config(directory: Path) -> Config:
    """The config.json of a checkpoint or of a run directory."""
    path = _require(Path(directory) / CONFIG_FILE)
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load model.safetensors into `model`; a missing or mismatched tensor is a CheckpointError."""
    path = _require(Path(ckpt) / MODEL_FILE)
    try:
        state = safetensors.torch.load_file(path, device="cpu")
        model.load_state_dict(state, strict=True)
    except Exception as e:  # a corrupt file, or tensors that do not match this model
        raise CheckpointError(f"cannot load weights from {path}: {e}") from None


def load_train_state(ckpt: Path) -> dict[str, Any]:
    path = _require(Path(ckpt) / STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory as given, or a run directory's latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if _STEP_DIR.fullmatch(path.name) or (path / MODEL_FILE).is_file():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path} holds no checkpoint (looked for {path / CHECKPOINTS}/step_XXXXXXXX)")
    return ckpt


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[TransfusionModel, Config, Tokenizer]:
    """Rebuild the model of a checkpoint (or of a run's latest checkpoint) for sampling, in eval mode."""
    ckpt = resolve_checkpoint(path)
    cfg = load_config(ckpt)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    model = TransfusionModel(cfg.model, tokenizer.vocab_size)
    load_weights(model, ckpt)
    return model.to(device).eval(), cfg, tokenizer


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k in ("model", "objective", "data", "train"):
            keys += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def check_resumable(saved: Config, current: Config) -> list[str]:
    """Raise if the model (or its tokenizer) changed; return the other keys that differ."""
    diff = config_diff(saved.to_dict(), current.to_dict())
    fatal = [k for k in diff if k.startswith("model.") or k == "data.tokenizer"]
    if fatal:
        details = ", ".join(f"{k}: {_get(saved, k)!r} -> {_get(current, k)!r}" for k in fatal)
        raise ConfigError(f"cannot resume: the checkpoint's model differs from this config ({details})")
    return diff


def _get(cfg: Config, key: str) -> Any:
    section, leaf = key.split(".")
    return getattr(getattr(cfg, section), leaf)
