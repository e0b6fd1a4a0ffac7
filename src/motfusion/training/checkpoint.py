"""Checkpoints: atomic, self-describing directories under RUN/checkpoints/step_XXXXXXXX/.

Each holds `model.safetensors` (the weights), `ema.safetensors` (their moving average, with
train.ema > 0; training/ema.py), `train_state.pt` (optimizer, step, RNG and packer
state: tensors and plain containers only, so it loads with `torch.load(weights_only=True)`) and
`config.json` (the full config, enough to rebuild the model for sampling).

A checkpoint is written into a temporary sibling directory, every file is fsynced, and the
directory is renamed into place, so a crash never leaves a partial checkpoint under a final name.

Runs of several processes (training/distributed.py) write one of two formats. Full (one process,
ddp): the files above, written by rank 0. Sharded (fsdp): `sharded/` holds the weights and the
optimizer state as torch.distributed.checkpoint (DCP) files (`sharded_ema/` the moving average), each rank writing its own shards into
the same temporary directory; rank 0 writes the rest and renames it after a barrier. Either format
loads into any number of processes and any train.parallel: DCP reshards on load, and full tensors
are sharded by `set_model_state_dict`. Optimizer state is keyed by parameter name in both.

`export_checkpoint` makes one file to share: the weights as safetensors, the config JSON in its
metadata (and in a config.json beside it). Nothing here unpickles code: weights come from safetensors,
the training state from `torch.load(weights_only=True)`.

Sampling reads the moving average when a checkpoint has one (`load_model(..., ema=True)`, the
default) and the raw weights with `ema=False`; an export holds the one it was asked for.

A run directory has one writer: `RunLock` (an OS lock on RUN/.lock, held for the life of the
process) keeps a second `train` out. Every file here is written through Python's own file objects,
so a full disk or a read-only file system surfaces as an OSError naming the file (never a
truncated file renamed into place); `write_error` turns it into one line. docs/GUARANTEES.md lists
what survives what.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from motfusion.config import Config
from motfusion.errors import CheckpointError, ConfigError, WriteError
from motfusion.models.transfusion import TransfusionModel
from motfusion.tokenizer import (
    TOKENIZER_FILE,
    BPETokenizer,
    Tokenizer,
    build_tokenizer,
    trained_vocab,
)
from motfusion.training.distributed import barrier, is_distributed, is_main
from motfusion.training.ema import EMA
from motfusion.training.files import (
    TMP_PREFIX,
    check_writable_file,
    fsync,
    write_atomic,
    write_error,
    write_file,
)

CHECKPOINTS = "checkpoints"
MODEL_FILE, STATE_FILE, CONFIG_FILE = "model.safetensors", "train_state.pt", "config.json"
EMA_FILE, EMA_SHARDED_DIR = "ema.safetensors", "sharded_ema"  # the moving average (train.ema), full / DCP
WEIGHTS_METADATA = "motfusion_weights"  # an exported file's metadata: "ema" or "raw"
TOKENIZER_METADATA = "motfusion_tokenizer"  # an exported file's metadata: a bpe:N run's tokenizer JSON
CONFIG_METADATA = "motfusion_config"  # the metadata key of an exported file's config JSON
SHARDED_DIR = "sharded"  # a sharded checkpoint's DCP files: {"model": ..., "optimizer": ...}
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU
_STEP_DIR = re.compile(r"step_(\d{8})")


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


def _write_files(
    tmp: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    cfg: Config,
    train_state: dict[str, Any],
    sharded: bool,
    ema: EMA | None,
    run_dir: Path,
) -> None:
    """Called by every rank: the state dict calls and DCP's save are collective."""
    state, names = dict(train_state), [STATE_FILE, CONFIG_FILE]
    if sharded:  # each rank writes its shards; DCP fsyncs them and rank 0 writes the metadata
        shards = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            shards["optimizer"] = get_optimizer_state_dict(model, optimizer)
        dcp.save(shards, checkpoint_id=tmp / SHARDED_DIR)
        if ema is not None:  # under "model", so it loads into a model like the weights do
            dcp.save({"model": ema.state_dict()}, checkpoint_id=tmp / EMA_SHARDED_DIR)
    else:
        weights = get_model_state_dict(model, options=_FULL)
        averages = ema.full_state_dict() if ema is not None else None
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not is_main():
        return
    if not sharded:
        for tensors, name in ((weights, MODEL_FILE), (averages, EMA_FILE)):
            if tensors is not None:
                write_file(
                    tmp / name,
                    lambda f, t=tensors: f.write(
                        safetensors.torch.save({k: v.contiguous() for k, v in t.items()})
                    ),
                )
                names.append(name)
    write_file(tmp / STATE_FILE, lambda f: torch.save(state, f))
    write_file(tmp / CONFIG_FILE, lambda f: f.write((json.dumps(cfg.to_dict(), indent=2) + "\n").encode()))
    if (Path(run_dir) / TOKENIZER_FILE).is_file():  # data.tokenizer=bpe:N: the checkpoint carries its own
        shutil.copyfile(Path(run_dir) / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        names.append(TOKENIZER_FILE)
    for name in names:
        fsync(tmp / name)
    fsync(tmp)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    cfg: Config,
    train_state: dict[str, Any],
    keep: int = 0,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    sharded: bool = False,
    ema: EMA | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then keep only the newest `keep` (0: keep all).

    `ema`: the weights' moving average, saved beside them. `model` may be parallelized
    (training/parallelize.py works in place). With several processes
    every rank calls this; `sharded` writes the sharded format (see the module docstring)."""
    final = step_dir(run_dir, step)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"  # the same path on every rank
    if is_main():
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        _write_files(tmp, model, optimizer, cfg, train_state, sharded, ema, run_dir)
        barrier()  # every rank's shards are on disk
        if is_main():
            if final.exists():  # the same step written again (e.g. a run redone): replace it whole
                stale = final.parent / f"{TMP_PREFIX}{final.name}-old"
                os.replace(final, stale)
                shutil.rmtree(stale)
            os.replace(tmp, final)
            fsync(final.parent)
    except BaseException as e:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            last = latest_checkpoint(run_dir)
            raise write_error(
                e, f"checkpoint {final}", f"; the last checkpoint, {last}, is intact" if last else ""
            ) from None
        raise
    if is_main():
        prune_checkpoints(run_dir, keep)
    barrier()  # no rank reads or overwrites the checkpoint before it is in place
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (0 keeps all), and leftovers of crashed writes.

    A run has one writer, so any temporary directory still here belongs to a write that died."""
    for leftover in (Path(run_dir) / CHECKPOINTS).glob(f"{TMP_PREFIX}*"):
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
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    return parse_config(text, str(path))


def parse_config(text: str, where: str) -> Config:
    """A config from its JSON text (a config.json, an export's metadata). Hand-edited or damaged text
    gives one CheckpointError naming `where` and, through the config's own checks, the key."""
    try:
        d = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{where} must hold a JSON object (the config's sections), not {_json_type(d)}")
    for section in ("model", "objective", "data", "train"):
        if section in d and not isinstance(d[section], dict):
            raise CheckpointError(
                f"{where}: {section!r} must be an object of keys, not {_json_type(d[section])}"
            )
    try:
        return Config.from_dict(d)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type reaching a check
        raise CheckpointError(
            f"{where}: a value has the wrong type ({e}); compare it with `motfusion config --recipe NAME`"
        ) from None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def weights_mismatch(model: torch.nn.Module, path: Path) -> list[str]:
    """The tensors of a safetensors file that do not fit `model`: other shapes, missing or extra names."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safetensors.safe_open(path, framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return (
        [
            f"{k} {found[k]} in the file, {expected[k]} in the model"
            for k in sorted(expected.keys() & found.keys())
            if found[k] != expected[k]
        ]
        + [f"{k} missing from the file" for k in sorted(expected.keys() - found.keys())]
        + [f"{k} not in the model" for k in sorted(found.keys() - expected.keys())]
    )


def _mismatch_message(path: Path, problems: list[str], model: torch.nn.Module, saved: Config | None) -> str:
    message = f"{path} does not fit this model"
    current = getattr(model, "cfg", None)
    if saved is not None and dataclasses.is_dataclass(current):
        in_file, in_model = saved.to_dict()["model"], dataclasses.asdict(current)
        details = [
            f"model.{k} {in_file.get(k)!r} in the file, {in_model.get(k)!r} in the model"
            for k in config_diff(in_file, in_model)
        ]
        message += f"; its config differs: {', '.join(details)}" if details else ""
    shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
    return message + f"; {len(problems)} tensor(s) differ: {shown}"


def _weights_file(path: Path) -> Path:
    """An exported .safetensors file as given, or a checkpoint directory's model.safetensors."""
    path = Path(path)
    return _require(path if path.is_file() else path / MODEL_FILE)


def _saved_config(path: Path) -> Config | None:
    """The config that came with a checkpoint directory or an exported file, when there is one."""
    try:
        return load_exported_config(path) if Path(path).is_file() else load_config(path)
    except (CheckpointError, ConfigError):
        return None


def has_ema(ckpt: Path) -> bool:
    """A checkpoint directory that holds the weights' moving average (train.ema > 0)."""
    return (Path(ckpt) / EMA_FILE).is_file() or (Path(ckpt) / EMA_SHARDED_DIR).is_dir()


def load_weights(model: torch.nn.Module, ckpt: Path, ema: bool = False) -> None:
    """Load a checkpoint's (or an exported file's) weights into `model`; `ema`: the checkpoint's
    moving average instead (it must have one: see has_ema).

    Tensors that do not fit raise a CheckpointError naming them with both shapes, and the config keys
    in which the checkpoint's model differs from `model.cfg`. `model` may be parallelized (FSDP
    shards the weights it loads); a sharded checkpoint is resharded to it by DCP."""
    if is_sharded(ckpt):
        state = {"model": get_model_state_dict(model)}
        _load_shards(ckpt, state, EMA_SHARDED_DIR if ema else SHARDED_DIR)
        set_model_state_dict(model, state["model"])
        return
    path = _require(Path(ckpt) / EMA_FILE) if ema else _weights_file(ckpt)
    set_model_state_dict(
        model, _read_weights(model, path, ckpt), options=StateDictOptions(full_state_dict=True)
    )


def _read_weights(model: torch.nn.Module, path: Path, ckpt: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked to fit `model`."""
    try:
        problems = weights_mismatch(model, path)
        state = safetensors.torch.load_file(path, device="cpu")
    except Exception as e:  # not a safetensors file, or a corrupt one
        raise CheckpointError(f"cannot read weights from {path}: {e}") from None
    if problems:
        raise CheckpointError(_mismatch_message(path, problems, model, _saved_config(ckpt)))
    return state


def load_ema(ema: EMA, model: torch.nn.Module, ckpt: Path) -> None:
    """Restore the moving average of `ckpt` (either format) into `ema`, laid out like `model`."""
    if is_sharded(ckpt):
        _load_shards(ckpt, {"model": ema.state_dict()}, EMA_SHARDED_DIR)  # in place, shard by shard
        return
    path = _require(Path(ckpt) / EMA_FILE)
    ema.load_state_dict(_read_weights(model, path, ckpt))


def is_sharded(ckpt: Path) -> bool:
    """A checkpoint in the sharded (FSDP, DCP) format."""
    return (Path(ckpt) / SHARDED_DIR).is_dir()


def _load_shards(ckpt: Path, state: dict[str, Any], name: str = SHARDED_DIR) -> None:
    """Fill `state`'s tensors, laid out as this process holds them, from a sharded checkpoint's DCP
    directory `name`."""
    path = Path(ckpt) / name
    try:
        with warnings.catch_warnings():  # DCP warns that one process without a process group reads alone
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, no_dist=not is_distributed())
    except Exception as e:  # missing or mismatched tensors, or unreadable files
        raise CheckpointError(f"cannot load {path}: {e}") from None


def load_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path, train_state: dict[str, Any]
) -> None:
    """Restore the optimizer state of `ckpt` (either format; `train_state` is its load_train_state)."""
    if is_sharded(ckpt):
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        _load_shards(ckpt, state)
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        return
    if "optimizer" not in train_state:
        raise CheckpointError(f"{Path(ckpt) / STATE_FILE} holds no optimizer state; it cannot be resumed")
    try:
        set_optimizer_state_dict(
            model, optimizer, train_state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
    except Exception as e:
        raise CheckpointError(f"cannot load the optimizer state of {Path(ckpt) / STATE_FILE}: {e}") from None


def load_train_state(ckpt: Path) -> dict[str, Any]:
    path = _require(Path(ckpt) / STATE_FILE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} must hold a dict of training state, not {type(state).__name__}")
    return state


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory as given, or a run directory's latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if _STEP_DIR.fullmatch(path.name) or (path / MODEL_FILE).is_file() or is_sharded(path):
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path} holds no checkpoint (looked for {path / CHECKPOINTS}/step_XXXXXXXX)")
    return ckpt


def export_checkpoint(path: Path, out: Path, ema: bool = True) -> Path:
    """Write a checkpoint's (or a run's latest checkpoint's) weights to the single file `out`
    (.safetensors), with the config JSON in its metadata and in a config.json beside it. `ema`: the
    moving average where the checkpoint has one (metadata motfusion_weights says which was written)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: the export is one .safetensors file; name it e.g. model.safetensors")
    check_writable_file(out, "export")
    ckpt = resolve_checkpoint(path)
    cfg = load_config(ckpt)
    text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    beside = out.parent / CONFIG_FILE
    if beside.is_file() and beside.read_text() != text:
        raise CheckpointError(f"{beside} holds another model's config; export into another directory")
    ema = ema and has_ema(ckpt)
    if is_sharded(ckpt):  # DCP shards: assembled through the model they belong to
        state = load_model(ckpt, ema=ema)[0].state_dict()
    else:
        state = safetensors.torch.load_file(ckpt / EMA_FILE if ema else _weights_file(ckpt), device="cpu")
    metadata = {"format": "pt", CONFIG_METADATA: text, WEIGHTS_METADATA: "ema" if ema else "raw"}
    if trained_vocab(cfg.data.tokenizer):
        metadata[TOKENIZER_METADATA] = build_tokenizer(cfg.data.tokenizer, ckpt).to_json()
    try:
        write_atomic(out, lambda f: f.write(safetensors.torch.save(state, metadata=metadata)))
        write_atomic(beside, lambda f: f.write(text.encode()))
    except OSError as e:
        raise write_error(e, "export") from None
    return out


def load_exported_config(path: Path) -> Config:
    """The config of an exported file: from its metadata, else from the config.json beside it."""
    path = Path(path)
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get(CONFIG_METADATA)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if text is None:
        return load_config(path.parent)
    return parse_config(text, f"{path} (its {CONFIG_METADATA} metadata)")


def load_model(
    path: Path, device: torch.device | str = "cpu", ema: bool = True
) -> tuple[TransfusionModel, Config, Tokenizer]:
    """Rebuild the model of a checkpoint, a run's latest checkpoint or an exported .safetensors file
    for sampling, in eval mode: with the moving average of the weights where the checkpoint has one
    and `ema` is set, else the raw weights (an exported file holds one of the two)."""
    path = Path(path)
    ckpt = path if path.is_file() else resolve_checkpoint(path)
    cfg = load_exported_config(ckpt) if path.is_file() else load_config(ckpt)
    tokenizer = (
        _exported_tokenizer(path, cfg) if path.is_file() else build_tokenizer(cfg.data.tokenizer, ckpt)
    )
    model = TransfusionModel(cfg.model, tokenizer.vocab_size)
    load_weights(model, ckpt, ema=ema and has_ema(ckpt))  # an exported file holds one set: has_ema is False
    return model.to(device).eval(), cfg, tokenizer


def _exported_tokenizer(path: Path, cfg: Config) -> Tokenizer:
    """The tokenizer of an exported file: a bpe:N run's from the file's metadata, else from data.tokenizer."""
    n = trained_vocab(cfg.data.tokenizer)
    if n is None:
        return build_tokenizer(cfg.data.tokenizer)
    with safetensors.safe_open(path, framework="pt") as f:
        text = (f.metadata() or {}).get(TOKENIZER_METADATA)
    if text is None:
        raise CheckpointError(
            f"{path} was trained with data.tokenizer={cfg.data.tokenizer} but does not carry "
            f"its tokenizer ({TOKENIZER_METADATA} metadata); export it again with motfusion export"
        )
    return BPETokenizer.from_json(text, vocab_size=n)


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
