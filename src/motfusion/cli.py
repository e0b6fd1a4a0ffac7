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

import numpy as np
import torch

from motfusion.config import RECIPES, Config, ConfigError, get_recipe
from motfusion.models.transfusion import TransfusionModel
from motfusion.tokenizer import build_tokenizer
from motfusion.sampling import Generator, SampleConfig
from motfusion.training.checkpoint import CheckpointError, load_model, load_config
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


# ---- generate --------------------------------------------------------------------------------

def _sample_arguments(p: argparse.ArgumentParser) -> None:
    d = SampleConfig()
    p.add_argument("--steps", type=int, default=d.steps, help="denoising steps")
    p.add_argument("--sampler", default=d.sampler, help="ddim or ddpm (DDPM runs), euler (flow runs); auto picks")
    p.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--seed", type=int, default=0)


def _sample_config(args: argparse.Namespace) -> SampleConfig:
    if args.steps <= 0 or args.max_tokens <= 0 or not 0 < args.top_p <= 1 or args.temperature < 0:
        raise ConfigError("--steps and --max-tokens must be positive, --top-p in (0, 1], --temperature >= 0")
    return SampleConfig(steps=args.steps, sampler=args.sampler, guidance=args.guidance, max_tokens=args.max_tokens,
                        temperature=args.temperature, top_p=args.top_p)


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, type=Path, help="a run directory (its latest checkpoint) or a checkpoint")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", action="append", help="text to image (repeat for a batch)")
    mode.add_argument("--image", action="append", type=Path, help="image to text: a PNG/JPEG (repeat for a batch)")
    mode.add_argument("--interleaved", metavar="PROMPT", help="free-running text that may open images")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--out", type=Path, default=Path("samples"), help="where PNG files go")
    _sample_arguments(p)


def load_image(path: Path, size: int) -> torch.Tensor:
    """A picture file -> (3, size, size) in [-1, 1] (resized when it has another size)."""
    from PIL import Image as PILImage, UnidentifiedImageError
    try:
        pic = PILImage.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"cannot read image {path}: {e}") from None
    if pic.size != (size, size):
        pic = pic.resize((size, size), PILImage.BICUBIC)
    return torch.from_numpy(np.asarray(pic).copy()).permute(2, 0, 1).float() / 127.5 - 1


def _generate(args: argparse.Namespace) -> None:
    from motfusion.report import to_pil
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg, tok = load_model(args.ckpt, device=device)
    gen = Generator(model, tok, cfg.objective, cfg.data.image_size, _sample_config(args))
    g = torch.Generator(device=device).manual_seed(args.seed)
    if args.image:
        images = torch.stack([load_image(p, cfg.data.image_size) for p in args.image]).to(device)
        for path, caption in zip(args.image, gen.captions(images, g)):
            print(f"{path}\t{caption}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.interleaved is not None:
        from motfusion.sequence import Image
        for i, seg in enumerate(gen.interleaved(args.interleaved, g)):
            if isinstance(seg, Image):
                to_pil(seg.pixels).save(args.out / f"interleaved_{i:02d}.png")
                print(f"[image: {args.out / f'interleaved_{i:02d}.png'}]")
            else:
                print(seg.text)
        return
    prompts = [p for p in args.prompt for _ in range(args.n)]
    for i, (prompt, image) in enumerate(zip(prompts, gen.images(prompts, g))):
        path = args.out / f"{i:03d}_{_slug(prompt)}.png"
        to_pil(image).save(path)
        print(path)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)[:60]


# ---- eval ------------------------------------------------------------------------------------

def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, type=Path, help="a run directory (its latest checkpoint) or a checkpoint")
    p.add_argument("--suite", default="shapes", choices=["shapes"], help="which evaluation")
    p.add_argument("--n", type=int, default=64, help="prompts and images per metric")
    p.add_argument("--out", type=Path, help="JSON file for the metrics (default: CKPT/eval_SUITE.json)")
    _sample_arguments(p)


def _eval(args: argparse.Namespace) -> None:
    from motfusion.evaluation.shapes_suite import evaluate_shapes
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg, tok = load_model(args.ckpt, device=device)
    gen = Generator(model, tok, cfg.objective, cfg.data.image_size, _sample_config(args))
    metrics = evaluate_shapes(gen, n_single=args.n, n_prompts=args.n, n_captions=args.n, seed=args.seed).metrics
    out = args.out or (args.ckpt if args.ckpt.is_dir() else args.ckpt.parent) / f"eval_{args.suite}.json"
    out.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out}")


# ---- demo ------------------------------------------------------------------------------------

def _demo_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, recipe_required=False)
    p.set_defaults(recipe="demo")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory; the report goes to OUT/report/")
    p.add_argument("--steps", type=int, help="shorthand for train.steps=N")
    p.add_argument("--sample-steps", type=int, default=50, help="denoising steps for the evaluation samples")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--n-eval", type=int, default=64, help="held-out prompts and images per metric")


def _demo(args: argparse.Namespace) -> None:
    from motfusion.demo import run_demo
    n = args.n_eval
    run_demo(config_from_args(args), args.out, SampleConfig(steps=args.sample_steps, guidance=args.guidance),
             n_single=n, n_prompts=n, n_captions=n)


COMMANDS: dict[str, Command] = {
    "demo": Command("train the default model on shapes, evaluate it and write an HTML report", _demo_arguments, _demo),
    "eval": Command("evaluate a checkpoint on a suite (shapes: geneval, caption_accuracy)", _eval_arguments, _eval),
    "generate": Command("sample from a checkpoint: text to image, image to text, or interleaved", _generate_arguments, _generate),
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
