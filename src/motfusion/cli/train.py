"""`motfusion train`, `export`, `recipes` and `config`: runs and their configs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from motfusion.cli.common import (
    Command,
    add_config_arguments,
    add_weights_argument,
    config_from_args,
)
from motfusion.config import Config
from motfusion.errors import CheckpointError, ConfigError
from motfusion.models.transfusion import TransfusionModel
from motfusion.recipes import RECIPES, get_recipe
from motfusion.tokenizer import vocab_size
from motfusion.training.checkpoint import export_checkpoint, load_config
from motfusion.training.trainer import train


def train_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, recipe_required=False)
    p.add_argument(
        "--out", required=True, type=Path, help="run directory: config.json, metrics.jsonl, checkpoints/"
    )
    p.add_argument("--steps", type=int, help="shorthand for train.steps=N")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint (without --recipe: with its saved config)",
    )


def train_config(args: argparse.Namespace) -> Config:
    if args.recipe is not None:
        return config_from_args(args)
    if not args.resume:
        raise ConfigError(
            f"train needs --recipe NAME (one of {sorted(RECIPES)}), or --resume to continue --out"
        )
    if not (args.out / "config.json").is_file():
        raise CheckpointError(f"nothing to resume: {args.out / 'config.json'} not found")
    return config_from_args(args, base=load_config(args.out))


def run_train(args: argparse.Namespace) -> int:
    """SIGTERM (a scheduler's stop) exits 0 after checkpointing; SIGINT (Ctrl-C) exits 130, as interrupts do."""
    result = train(train_config(args), args.out, resume=args.resume)
    return 130 if result.stopped_by == "SIGINT" else 0


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt", required=True, type=Path, help="a run directory (its latest checkpoint) or a checkpoint"
    )
    p.add_argument(
        "--out", required=True, type=Path, help="the .safetensors file to write; a config.json goes beside it"
    )
    add_weights_argument(p)


def run_export(args: argparse.Namespace) -> None:
    out = export_checkpoint(args.ckpt, args.out, ema=not args.raw_weights)
    print(f"wrote {out} and {out.parent / 'config.json'}")


def run_recipes(args: argparse.Namespace) -> None:
    w = max(len(name) for name in RECIPES)
    print(
        f"{'recipe':<{w}} {'layers':>6} {'dim':>5} {'heads':>5} {'params':>9} {'non-emb':>9} "
        f"{'batch x seq':>12} {'steps':>8}"
    )
    for name in RECIPES:
        cfg = get_recipe(name)
        with torch.device("meta"):  # counts parameters without allocating a 7B model
            model = TransfusionModel(cfg.model, vocab_size(cfg.data.tokenizer))
        m, t = cfg.model, cfg.train
        print(
            f"{name:<{w}} {m.n_layers:>6} {m.dim:>5} {m.n_heads:>5} {_count(model.num_params()):>9} "
            f"{_count(model.num_params(non_embedding=True)):>9} {f'{t.batch_size}x{t.seq_len}':>12} {t.steps:>8}"
        )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def run_config(args: argparse.Namespace) -> None:
    print(json.dumps(config_from_args(args).to_dict(), indent=2))


COMMANDS = {
    "train": Command(train_arguments, run_train),
    "export": Command(export_arguments, run_export),
    "recipes": Command(lambda p: None, run_recipes),
    "config": Command(add_config_arguments, run_config),
}
