"""What every command shares: the Command record, config and sampling arguments, small parsers."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from motfusion.config import Config, read_config_file
from motfusion.errors import ConfigError
from motfusion.recipes import RECIPES, get_recipe
from motfusion.sampling import SampleConfig
from motfusion.sampling.load import default_device


@dataclass(frozen=True)
class Command:
    """One subcommand: a function that adds its arguments, a function that runs it (returning the exit
    status, or None for 0). Its name and help line are in cli/__init__.py's COMMANDS."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def add_config_arguments(p: argparse.ArgumentParser, recipe_required: bool = True) -> None:
    """--recipe NAME, --config FILE and section.key=value overrides, shared by every config-driven command."""
    p.add_argument(
        "--recipe",
        required=recipe_required,
        choices=sorted(RECIPES),
        metavar="NAME",
        help=f"named config: {', '.join(sorted(RECIPES))}",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a .yaml or .json file of config values (any subset, e.g. {train: {lr: 0.001}}), "
        "applied over the recipe and under the key=value overrides",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. model.untie=ffn train.lr=1e-3",
    )


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """The recipe (or `base`), then --config FILE, then the key=value overrides and --steps; validated."""
    cfg = base if base is not None else get_recipe(args.recipe)
    if getattr(args, "config", None) is not None:
        cfg.merge(read_config_file(args.config))
    overrides = list(args.overrides)
    if getattr(args, "steps", None) is not None:
        overrides.append(f"train.steps={args.steps}")
    return cfg.override(overrides)


def add_ckpt_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt",
        required=True,
        type=Path,
        help="a run directory (its latest checkpoint), a checkpoint or an exported .safetensors file",
    )


def add_weights_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--raw-weights",
        action="store_true",
        help="use the trained weights, not their moving average (runs with train.ema > 0 have both)",
    )


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    add_weights_argument(p)
    d = SampleConfig()
    p.add_argument("--steps", type=int, help="denoising steps; default: the model's objective.sample_steps")
    p.add_argument(
        "--sampler", default=d.sampler, help="ddim or ddpm (DDPM runs), euler (flow runs); auto picks"
    )
    add_guidance_argument(p)
    add_best_of_argument(p)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--seed", type=int, default=0)


def add_guidance_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale (1 = off); default: the model's objective.guidance",
    )
    p.add_argument(
        "--guidance-early",
        type=float,
        help="the scale over the first quarter of the denoising steps, where the layout forms; default: "
        "the model's objective.guidance_early (none: --guidance throughout)",
    )


def check_guidance(args: argparse.Namespace) -> None:
    for flag, scale in (("--guidance", args.guidance), ("--guidance-early", args.guidance_early)):
        if scale is not None and not math.isfinite(scale):
            raise ConfigError(f"{flag}={scale} must be a finite number (1 = off)")


def add_best_of_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--best-of",
        type=int,
        help="text to image: draw N images per prompt, keep the one the model reads back as its prompt "
        "best; default: the model's objective.best_of",
    )


def sample_config(args: argparse.Namespace) -> SampleConfig:
    if (
        (args.steps is not None and args.steps <= 0)
        or (args.best_of is not None and args.best_of <= 0)
        or args.max_tokens <= 0
        or not 0 < args.top_p <= 1
        or not 0 <= args.temperature < math.inf
    ):
        raise ConfigError(
            "--steps, --best-of and --max-tokens must be positive, --top-p in (0, 1], --temperature >= 0"
        )
    check_guidance(args)
    return SampleConfig(
        steps=args.steps,
        sampler=args.sampler,
        guidance=args.guidance,
        guidance_early=args.guidance_early,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        best_of=args.best_of,
    )


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (a GPU when there is one)")


def device_of(args: argparse.Namespace) -> torch.device:
    """--device, checked: auto picks cuda when available."""
    if args.device == "auto":
        return torch.device(default_device())
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(f"--device={args.device!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={args.device}: this machine has no CUDA GPU (torch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device={args.device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device={args.device}: use cpu, cuda, cuda:N or auto")
    return device


def csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)[:60]
