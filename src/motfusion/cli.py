"""The `motfusion` command line.

Each subcommand is a `Command` in COMMANDS: a help line, a function that adds its arguments to
its argparse subparser, and a function that runs it. A new subcommand is one more entry.
Mistakes a user can make (bad config, missing files, unusable checkpoint) end with one line,
`motfusion: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from motfusion.config import RECIPES, Config, ConfigError, get_recipe
from motfusion.models.transfusion import TransfusionModel
from motfusion.tokenizer import build_tokenizer
from motfusion.training.checkpoint import CheckpointError, load_config
from motfusion.training.trainer import NonFiniteLossError, train

PROG = "motfusion"
USER_ERRORS = (ConfigError, CheckpointError, NonFiniteLossError, FileNotFoundError)


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def add_config_arguments(p: argparse.ArgumentParser, recipe_required: bool = True) -> None:
    """--recipe NAME plus trailing section.key=value overrides, shared by every config-driven command."""
    p.add_argument("--recipe", required=recipe_required, choices=sorted(RECIPES), metavar="NAME",
                   help=f"named config: {', '.join(sorted(RECIPES))}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.untie=ffn train.lr=1e-3")


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """The recipe (or `base`) with --steps and the key=value overrides applied, validated."""
    cfg = base if base is not None else get_recipe(args.recipe)
    overrides = list(args.overrides)
    if getattr(args, "steps", None) is not None:
        overrides.append(f"train.steps={args.steps}")
    return cfg.override(overrides)


# ---- train -----------------------------------------------------------------------------------

def _train_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, recipe_required=False)
    p.add_argument("--out", required=True, type=Path, help="run directory: config.json, metrics.jsonl, checkpoints/")
    p.add_argument("--steps", type=int, help="shorthand for train.steps=N")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (without --recipe: with its saved config)")


def _train_config(args: argparse.Namespace) -> Config:
    if args.recipe is not None:
        return config_from_args(args)
    if not args.resume:
        raise ConfigError(f"train needs --recipe NAME (one of {sorted(RECIPES)}), or --resume to continue --out")
    if not (args.out / "config.json").is_file():
        raise CheckpointError(f"nothing to resume: {args.out / 'config.json'} not found")
    return config_from_args(args, base=load_config(args.out))


def _train(args: argparse.Namespace) -> None:
    train(_train_config(args), args.out, resume=args.resume)


# ---- recipes, config -------------------------------------------------------------------------

def _recipes(args: argparse.Namespace) -> None:
    print(f"{'recipe':<8} {'layers':>6} {'dim':>5} {'heads':>5} {'params':>9} {'non-emb':>9} "
          f"{'batch x seq':>12} {'steps':>8}")
    for name in RECIPES:
        cfg = get_recipe(name)
        with torch.device("meta"):  # counts parameters without allocating a 7B model
            model = TransfusionModel(cfg.model, build_tokenizer(cfg.data.tokenizer).vocab_size)
        m, t = cfg.model, cfg.train
        print(f"{name:<8} {m.n_layers:>6} {m.dim:>5} {m.n_heads:>5} {_count(model.num_params()):>9} "
              f"{_count(model.num_params(non_embedding=True)):>9} {f'{t.batch_size}x{t.seq_len}':>12} {t.steps:>8}")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _config(args: argparse.Namespace) -> None:
    print(json.dumps(config_from_args(args).to_dict(), indent=2))


def _config_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


COMMANDS: dict[str, Command] = {
    "train": Command("train a model (or --resume one)", _train_arguments, _train),
    "recipes": Command("list the named recipes and their sizes", lambda p: None, _recipes),
    "config": Command("print the resolved config of a recipe with overrides, as JSON", _config_arguments, _config),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Transfusion + Mixture-of-Transformers on text and images.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `motfusion` and `python -m motfusion`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
    except USER_ERRORS as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early, e.g. `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return status or 0
