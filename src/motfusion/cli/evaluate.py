"""`motfusion eval` (any suite of evaluation/suites.py), `demo`, `plot` and `compare`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from motfusion.cli.common import (
    Command,
    add_best_of_argument,
    add_ckpt_argument,
    add_config_arguments,
    add_device_argument,
    add_guidance_argument,
    add_sample_arguments,
    check_guidance,
    config_from_args,
    device_of,
    sample_config,
)
from motfusion.compare import compare
from motfusion.demo import run_demo
from motfusion.errors import CheckpointError, ConfigError
from motfusion.evaluation.losses import validation_losses
from motfusion.evaluation.suites import SUITES, SuiteOptions, evaluate
from motfusion.report import compare_runs
from motfusion.sampling import SampleConfig
from motfusion.sampling.load import load_generator
from motfusion.training.files import check_writable_file, write_json


def eval_arguments(p: argparse.ArgumentParser) -> None:
    add_ckpt_argument(p)
    p.add_argument("--suite", default="shapes", choices=sorted(SUITES), help="which evaluation")
    p.add_argument("--n", type=int, default=64, help="prompts and images per metric")
    p.add_argument(
        "--classifier",
        type=Path,
        default=SuiteOptions().classifier,
        help="fashion: a `motfusion train-classifier` directory (FID features, class accuracy)",
    )
    p.add_argument(
        "--clip",
        type=Path,
        help="fashion, emoji: a `motfusion train-clip` directory (default runs/clip-SUITE)",
    )
    p.add_argument(
        "--judge",
        type=Path,
        help="speech: a `motfusion train-asr-judge` directory to read the model's speech (default DATA/asr-judge)",
    )
    p.add_argument(
        "--val-batches",
        type=int,
        default=8,
        help="val batches for the per-modality validation loss (0: none)",
    )
    p.add_argument("--out", type=Path, help="JSON file for the metrics (default: CKPT/eval_SUITE.json)")
    add_device_argument(p)
    add_sample_arguments(p)


def run_eval(args: argparse.Namespace) -> None:
    if args.n <= 0 or args.val_batches < 0:
        raise ConfigError(f"--n={args.n} must be positive and --val-batches={args.val_batches} >= 0")
    samples = sample_config(args)
    if not args.ckpt.exists():
        raise CheckpointError(f"--ckpt {args.ckpt} does not exist")
    out = args.out or (args.ckpt if args.ckpt.is_dir() else args.ckpt.parent) / f"eval_{args.suite}.json"
    check_writable_file(out, "--out")  # before the minutes of evaluation, not after
    gen, cfg = load_generator(args.ckpt, device_of(args), samples, ema=not args.raw_weights)
    options = SuiteOptions(
        n=args.n, seed=args.seed, classifier=args.classifier, clip=args.clip, judge=args.judge
    )
    metrics = evaluate(args.suite, gen, cfg, options)
    if args.val_batches:  # 0: the suite's metrics alone
        metrics.update(validation_losses(gen.model, cfg, gen.tok, n_batches=args.val_batches, seed=args.seed))
    write_json(out, metrics)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out}")


def demo_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, recipe_required=False)
    p.set_defaults(recipe="demo")
    p.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="run directory; the report goes to OUT/report/"
    )
    p.add_argument("--steps", type=int, help="shorthand for train.steps=N")
    p.add_argument(
        "--sample-steps",
        type=int,
        help="denoising steps for the evaluation samples; default: the recipe's objective.sample_steps",
    )
    add_guidance_argument(p)
    add_best_of_argument(p)
    p.add_argument("--n-eval", type=int, default=64, help="held-out prompts and images per metric")


def run_demo_command(args: argparse.Namespace) -> int:
    """Like train: stopped by Ctrl-C it exits 130, by SIGTERM 0, in both cases before evaluating."""
    n = args.n_eval
    if any(v is not None and v <= 0 for v in (args.best_of, args.sample_steps)):
        raise ConfigError(f"--best-of={args.best_of} and --sample-steps={args.sample_steps} must be positive")
    check_guidance(args)
    metrics = run_demo(
        config_from_args(args),
        args.out,
        SampleConfig(
            steps=args.sample_steps,
            guidance=args.guidance,
            guidance_early=args.guidance_early,
            best_of=args.best_of,
        ),
        n_single=n,
        n_prompts=n,
        n_captions=n,
    )
    return 130 if metrics.get("stopped_by") == "SIGINT" else 0


def plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN", help="run directories, each with a metrics.jsonl"
    )
    p.add_argument("--out", required=True, type=Path, help="the PNG to write")


def run_plot(args: argparse.Namespace) -> None:
    keys = compare_runs(args.runs, args.out)
    print(f"wrote {args.out}: {', '.join(keys)} against steps and training FLOPs")


def compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dense", type=Path, metavar="RUN_DENSE", help="the dense baseline's run directory")
    p.add_argument("mot", type=Path, metavar="RUN_MOT", help="the Mixture-of-Transformers run directory")
    p.add_argument("--out", type=Path, default=Path("compare"), help="where compare.json, .md and .png go")


def run_compare(args: argparse.Namespace) -> None:
    compare(args.dense, args.mot, args.out)
    print((args.out / "compare.md").read_text(), end="")


COMMANDS = {
    "demo": Command(demo_arguments, run_demo_command),
    "eval": Command(eval_arguments, run_eval),
    "plot": Command(plot_arguments, run_plot),
    "compare": Command(compare_arguments, run_compare),
}
