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

from motfusion.config import Config
from motfusion.data.images import read_image
from motfusion.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from motfusion.models.transfusion import TransfusionModel
from motfusion.recipes import RECIPES, get_recipe
from motfusion.sampling import Generator, SampleConfig
from motfusion.sampling.load import load_generator
from motfusion.tokenizer import vocab_size
from motfusion.training import vae as vae_cli
from motfusion.training import vq as vq_cli
from motfusion.training.checkpoint import export_checkpoint, load_config
from motfusion.training.trainer import train

PROG = "motfusion"
USER_ERRORS = (ConfigError, CheckpointError, NonFiniteLossError, FileNotFoundError, DataError)


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


def _train(args: argparse.Namespace) -> int:
    """SIGTERM (a scheduler's stop) exits 0 after checkpointing; SIGINT (Ctrl-C) exits 130, as interrupts do."""
    result = train(_train_config(args), args.out, resume=args.resume)
    return 130 if result.stopped_by == "SIGINT" else 0


# ---- export, plot ----------------------------------------------------------------------------

def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, type=Path, help="a run directory (its latest checkpoint) or a checkpoint")
    p.add_argument("--out", required=True, type=Path, help="the .safetensors file to write; a config.json goes beside it")
    _weights_argument(p)


def _export(args: argparse.Namespace) -> None:
    out = export_checkpoint(args.ckpt, args.out, ema=not args.raw_weights)
    print(f"wrote {out} and {out.parent / 'config.json'}")


def _plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories, each with a metrics.jsonl")
    p.add_argument("--out", required=True, type=Path, help="the PNG to write")


def _plot(args: argparse.Namespace) -> None:
    from motfusion.report import compare_runs
    keys = compare_runs(args.runs, args.out)
    print(f"wrote {args.out}: {', '.join(keys)} against steps and training FLOPs")


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dense", type=Path, metavar="RUN_DENSE", help="the dense baseline's run directory")
    p.add_argument("mot", type=Path, metavar="RUN_MOT", help="the Mixture-of-Transformers run directory")
    p.add_argument("--out", type=Path, default=Path("compare"), help="where compare.json, .md and .png go")


def _compare(args: argparse.Namespace) -> None:
    from motfusion.compare import compare
    compare(args.dense, args.mot, args.out)
    print((args.out / "compare.md").read_text(), end="")


# ---- recipes, config -------------------------------------------------------------------------

def _recipes(args: argparse.Namespace) -> None:
    w = max(len(name) for name in RECIPES)
    print(f"{'recipe':<{w}} {'layers':>6} {'dim':>5} {'heads':>5} {'params':>9} {'non-emb':>9} "
          f"{'batch x seq':>12} {'steps':>8}")
    for name in RECIPES:
        cfg = get_recipe(name)
        with torch.device("meta"):  # counts parameters without allocating a 7B model
            model = TransfusionModel(cfg.model, vocab_size(cfg.data.tokenizer))
        m, t = cfg.model, cfg.train
        print(f"{name:<{w}} {m.n_layers:>6} {m.dim:>5} {m.n_heads:>5} {_count(model.num_params()):>9} "
              f"{_count(model.num_params(non_embedding=True)):>9} {f'{t.batch_size}x{t.seq_len}':>12} {t.steps:>8}")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _config(args: argparse.Namespace) -> None:
    print(json.dumps(config_from_args(args).to_dict(), indent=2))


def _config_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


# ---- generate --------------------------------------------------------------------------------

def _weights_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw-weights", action="store_true",
                   help="use the trained weights, not their moving average (runs with train.ema > 0 have both)")


def _sample_arguments(p: argparse.ArgumentParser) -> None:
    _weights_argument(p)
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
    mode.add_argument("--speak", metavar="TEXT", help="text to speech (speech runs): writes a WAV")
    mode.add_argument("--transcribe", action="append", type=Path, metavar="WAV", help="speech to text (repeat for a batch)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--out", type=Path, default=Path("samples"), help="where PNG files go (--speak: a .wav file or a folder)")
    _sample_arguments(p)


def _generate(args: argparse.Namespace) -> None:
    from motfusion.data.images import to_pil
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen, cfg = load_generator(args.ckpt, device, _sample_config(args), ema=not args.raw_weights)
    g = torch.Generator(device=device).manual_seed(args.seed)
    if args.speak is not None or args.transcribe:
        return _generate_speech(args, gen, cfg, g)
    if args.image:
        images = torch.stack([read_image(p, cfg.data.image_size) for p in args.image]).to(device)
        for path, caption in zip(args.image, gen.captions(images, g)):
            print(f"{path}\t{caption}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.interleaved is not None:
        from motfusion.sequence import Image, Units
        for i, seg in enumerate(gen.interleaved(args.interleaved, g)):
            if isinstance(seg, Image):
                to_pil(gen.decode_images(seg.pixels[None])[0]).save(args.out / f"interleaved_{i:02d}.png")
                print(f"[image: {args.out / f'interleaved_{i:02d}.png'}]")
            elif isinstance(seg, Units):
                print(f"[{seg.modality}: {len(seg.ids)} units]")
            else:
                print(seg.text)
        return
    prompts = [p for p in args.prompt for _ in range(args.n)]
    for i, (prompt, image) in enumerate(zip(prompts, gen.decode_images(gen.images(prompts, g)))):
        path = args.out / f"{i:03d}_{_slug(prompt)}.png"
        to_pil(image).save(path)
        print(path)


def _generate_speech(args: argparse.Namespace, gen: Generator, cfg: Config, g: torch.Generator) -> None:
    from motfusion.codecs.audio import write_wav
    from motfusion.codecs.speech import speech_tokenizer_of
    from motfusion.sampling.speech import speech_to_text, text_to_units
    stok = speech_tokenizer_of(cfg)
    if args.transcribe:
        units = [stok.encode_file(path) for path in args.transcribe]
        for path, text in zip(args.transcribe, speech_to_text(gen, units, g)):
            print(f"{path}\t{text}")
        return
    units = text_to_units(gen, stok, [args.speak], g)[0]
    path = args.out if args.out.suffix.lower() == ".wav" else args.out / f"{_slug(args.speak)}.wav"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, stok.decode(units), stok.sample_rate)
    print(f"{path}\t{len(units)} units, {len(units) / stok.cfg.mel.frame_rate:.2f} s")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)[:60]


# ---- eval ------------------------------------------------------------------------------------

def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, type=Path, help="a run directory (its latest checkpoint) or a checkpoint")
    p.add_argument("--suite", default="shapes", choices=["shapes", "fashion", "emoji", "speech"], help="which evaluation")
    p.add_argument("--n", type=int, default=64, help="prompts and images per metric")
    p.add_argument("--classifier", type=Path, default=Path("runs/classifier"),
                   help="fashion: a `motfusion train-classifier` directory (FID features, class accuracy)")
    p.add_argument("--clip", type=Path, help="fashion, emoji: a `motfusion train-clip` directory (default runs/clip-SUITE)")
    p.add_argument("--val-batches", type=int, default=8, help="val batches for the per-modality validation loss")
    p.add_argument("--out", type=Path, help="JSON file for the metrics (default: CKPT/eval_SUITE.json)")
    _sample_arguments(p)


def _suite_metrics(args: argparse.Namespace, gen: Generator, cfg: Config) -> dict[str, float]:
    from motfusion.evaluation.classifier import load_classifier
    from motfusion.evaluation.clip import load_clip
    from motfusion.evaluation.image_metrics import evaluate_emoji, evaluate_fashion
    from motfusion.evaluation.shapes_suite import evaluate_shapes
    if args.suite == "shapes":
        return evaluate_shapes(gen, n_single=args.n, n_prompts=args.n, n_captions=args.n, seed=args.seed).metrics
    if args.suite == "speech":
        from motfusion.evaluation.speech import evaluate_speech
        return evaluate_speech(gen, cfg, n=args.n, seed=args.seed)
    clip, _ = load_clip(args.clip or Path(f"runs/clip-{args.suite}"))
    if args.suite == "emoji":
        return evaluate_emoji(gen, cfg, clip, n=args.n, seed=args.seed)
    return evaluate_fashion(gen, cfg, load_classifier(args.classifier), clip, n=args.n, seed=args.seed)


def _eval(args: argparse.Namespace) -> None:
    from motfusion.evaluation.losses import validation_losses
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen, cfg = load_generator(args.ckpt, device, _sample_config(args), ema=not args.raw_weights)
    metrics = _suite_metrics(args, gen, cfg)
    metrics.update(validation_losses(gen.model, cfg, gen.tok, n_batches=args.val_batches, seed=args.seed))
    out = args.out or (args.ckpt if args.ckpt.is_dir() else args.ckpt.parent) / f"eval_{args.suite}.json"
    out.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out}")


# ---- image metric models ---------------------------------------------------------------------

def _train_classifier_arguments(p: argparse.ArgumentParser) -> None:
    from motfusion.data.fashion import FASHION_DIR
    from motfusion.evaluation.classifier import ClassifierConfig
    d = ClassifierConfig()
    p.add_argument("--out", required=True, type=Path, help="directory for classifier.safetensors and classifier.json")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--data", type=Path, default=FASHION_DIR, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--seed", type=int, default=d.seed)


def _train_classifier(args: argparse.Namespace) -> None:
    from motfusion.evaluation.classifier import ClassifierConfig, fit_fashion_classifier
    cfg = ClassifierConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    fit_fashion_classifier(cfg, args.out, root=args.data)


def _train_clip_arguments(p: argparse.ArgumentParser) -> None:
    from motfusion.evaluation.clip import ClipConfig
    d = ClipConfig()
    p.add_argument("--dataset", required=True, help="as data.dataset: fashion, emoji, fashion:PATH, ...")
    p.add_argument("--out", required=True, type=Path, help="directory for clip.safetensors and clip.json")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--image-size", type=int, default=d.input_size, help="as data.image_size")
    p.add_argument("--seed", type=int, default=d.seed)


def _train_clip(args: argparse.Namespace) -> None:
    from motfusion.data.pipeline import build_dataset
    from motfusion.evaluation.clip import ClipConfig, fit_clip
    # Only the data section matters here; patch size 1 accepts any image size.
    data_cfg = Config().override([f"data.dataset={args.dataset}", f"data.image_size={args.image_size}", "model.patch_size=1"])
    cfg = ClipConfig(steps=args.steps, batch_size=args.batch_size, input_size=args.image_size, seed=args.seed)
    fit_clip(cfg, build_dataset(data_cfg, "train"), build_dataset(data_cfg, "val"), args.out,
             {"dataset": args.dataset, "image_size": args.image_size})


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


# ---- speech data -----------------------------------------------------------------------------

def _make_speech_data_arguments(p: argparse.ArgumentParser) -> None:
    from motfusion.data.espeak import SOURCES, VOICES
    p.add_argument("--out", required=True, type=Path, help="dataset directory: wav/, manifest.jsonl, dataset.json")
    p.add_argument("--n", type=int, default=2000, help="number of utterances")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated text sources from {', '.join(SOURCES)}")
    p.add_argument("--voices", default=",".join(VOICES), help="comma-separated espeak-ng voices (variants: en+f3)")
    p.add_argument("--max-chars", type=int, default=48, help="longest sentence, in characters")
    p.add_argument("--val-percent", type=int, default=5, help="share of sentences held out for val (by a hash of the text)")
    p.add_argument("--seed", type=int, default=0)


def _make_speech_data(args: argparse.Namespace) -> None:
    from motfusion.data.espeak import make_speech_data
    make_speech_data(args.out, n=args.n, sources=tuple(_csv(args.sources)), voices=tuple(_csv(args.voices)),
                     max_chars=args.max_chars, val_percent=args.val_percent, seed=args.seed)


def _train_speech_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    from motfusion.codecs.speech import SpeechTokenizerConfig
    d = SpeechTokenizerConfig()
    p.add_argument("--data", required=True, type=Path, help="a directory written by make-speech-data")
    p.add_argument("--out", type=Path, help="tokenizer directory (default: DATA/tokenizer)")
    p.add_argument("--k", type=int, default=d.k, help="vocabulary size (k-means clusters)")
    p.add_argument("--iters", type=int, default=d.iters, help="Lloyd iterations (at most)")
    p.add_argument("--max-frames", type=int, default=d.max_frames, help="frames sampled to fit k-means on")
    p.add_argument("--dedup", action="store_true", help="collapse repeated units (shorter sequences, durations lost)")
    p.add_argument("--seed", type=int, default=d.seed)


def _train_speech_tokenizer(args: argparse.Namespace) -> None:
    from motfusion.codecs.speech import SpeechTokenizerConfig
    from motfusion.training.speech_units import train_speech_tokenizer
    if args.k < 2 or args.iters < 0 or args.max_frames < args.k:
        raise ConfigError("--k must be >= 2, --iters >= 0 and --max-frames >= --k")
    cfg = SpeechTokenizerConfig(k=args.k, iters=args.iters, max_frames=args.max_frames, seed=args.seed, dedup=args.dedup)
    train_speech_tokenizer(args.data, args.out, cfg)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


COMMANDS: dict[str, Command] = {
    "demo": Command("train the default model on shapes, evaluate it and write an HTML report", _demo_arguments, _demo),
    "eval": Command("evaluate a checkpoint on a suite (shapes, fashion, emoji) and its per-modality val loss",
                    _eval_arguments, _eval),
    "train-classifier": Command("train the Fashion-MNIST CNN behind fid_fashion_classifier and class_accuracy",
                                _train_classifier_arguments, _train_classifier),
    "train-clip": Command("train the small CLIP behind clip_score_motfusion on a dataset", _train_clip_arguments,
                          _train_clip),
    "generate": Command("sample from a checkpoint: text to image, image to text, or interleaved", _generate_arguments, _generate),
    "train": Command("train a model (or --resume one)", _train_arguments, _train),
    "export": Command("write a checkpoint's weights and config as one .safetensors file to share", _export_arguments,
                      _export),
    "plot": Command("plot per-modality loss curves of runs against steps and FLOPs", _plot_arguments, _plot),
    "compare": Command("step matching: when a MoT run reaches a dense run's final loss, in steps, FLOPs and time",
                       _compare_arguments, _compare),
    "recipes": Command("list the named recipes and their sizes", lambda p: None, _recipes),
    "config": Command("print the resolved config of a recipe with overrides, as JSON", _config_arguments, _config),
    "make-speech-data": Command("write a paired text-speech dataset spoken by espeak-ng", _make_speech_data_arguments,
                                _make_speech_data),
    "train-speech-tokenizer": Command("fit k-means speech units on a speech dataset and cache its units",
                                      _train_speech_tokenizer_arguments, _train_speech_tokenizer),
    "train-vae": Command("train the small KL-VAE on an image dataset, for data.image_repr=latents",
                         vae_cli.add_arguments, vae_cli.run),
    "train-vq": Command("train the VQ-VAE image tokenizer on an image dataset, for data.image_repr=tokens",
                        vq_cli.add_arguments, vq_cli.run),
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
