"""The `motfusion` command line.

COMMANDS below lists every subcommand with its help line and the cli/ module that holds it; each such
module has its own COMMANDS: name -> Command (cli/common.py), a function that adds the command's
arguments and a function that runs it. A new subcommand is one line here and one entry there.

Only the chosen command's module is imported, so `motfusion --help` does not load torch. Options
and `key=value` overrides may come in any order. Mistakes a user can make (bad config or data,
missing files, unusable checkpoint, a path that cannot be written, a full disk) end with one line,
`motfusion: error: ...`, and exit status 2. docs/GUARANTEES.md lists what survives what.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from motfusion import __version__
from motfusion.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError

PROG = "motfusion"
USER_ERRORS = (ConfigError, CheckpointError, NonFiniteLossError, FileNotFoundError, DataError)
COMMANDS = {  # name -> (module in motfusion.cli, help line)
    "demo": ("evaluate", "train the default model on shapes, evaluate it and write an HTML report"),
    "eval": (
        "evaluate",
        "evaluate a checkpoint on a suite (shapes, fashion, emoji, speech) and its val loss",
    ),
    "plot": ("evaluate", "plot per-modality loss curves of runs against steps and FLOPs"),
    "compare": (
        "evaluate",
        "step matching: when a MoT run reaches a dense run's final loss, in steps, FLOPs, time",
    ),
    "generate": (
        "generate",
        "sample from a checkpoint: text to image, image to text, interleaved, or speech",
    ),
    "serve": ("serve", "a web playground on a checkpoint: its tasks in a browser, on localhost"),
    "train": ("train", "train a model (or --resume one)"),
    "export": ("train", "write a checkpoint's weights and config as one .safetensors file to share"),
    "recipes": ("train", "list the named recipes and their sizes"),
    "config": ("train", "print the resolved config of a recipe with overrides, as JSON"),
    "make-speech-data": ("auxiliary", "write a paired text-speech dataset spoken by espeak-ng"),
    "train-speech-tokenizer": (
        "auxiliary",
        "fit k-means speech units on a speech dataset and cache its units",
    ),
    "train-unit-vocoder": ("auxiliary", "train the speech codec's decoder from units to log-mel frames"),
    "train-asr-judge": ("auxiliary", "train the CTC speech recogniser behind wer_judge on a speech dataset"),
    "eval-speech-codec": ("auxiliary", "the judge's WER on val audio resynthesized through the speech codec"),
    "train-vae": ("auxiliary", "train the small KL-VAE on an image dataset, for data.image_repr=latents"),
    "train-vq": (
        "auxiliary",
        "train the VQ-VAE image tokenizer on an image dataset, for data.image_repr=tokens",
    ),
    "train-classifier": (
        "auxiliary",
        "train the Fashion-MNIST CNN behind fid_fashion_classifier and class_accuracy",
    ),
    "train-clip": ("auxiliary", "train the small CLIP behind clip_score_motfusion on a dataset"),
}


def index_parser() -> argparse.ArgumentParser:
    """`motfusion [--version] COMMAND ...`: the command's own arguments are left for command_parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Transfusion + Mixture-of-Transformers on text, "
        "images and speech. `motfusion COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_line) in COMMANDS.items():
        sub.add_parser(name, help=help_line, add_help=False)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command, built from its module (which may import torch)."""
    module, help_line = COMMANDS[name]
    command = importlib.import_module(f"motfusion.cli.{module}").COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"{PROG} {name}", description=help_line)
    command.add_arguments(parser)
    parser.set_defaults(run=command.run)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options and positional `key=value` overrides in any order (argparse's intermixed parsing)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    top, rest = index_parser().parse_known_args(argv)
    return command_parser(top.command).parse_intermixed_args(rest)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `motfusion` and `python -m motfusion`; returns the exit status."""
    args = parse_args(argv)
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
    except OSError as e:  # the file system said no (read-only, full, a file in the way): path and cause
        print(f"{PROG}: error: {os_error_text(e)}", file=sys.stderr)
        return 2
    return status or 0


def os_error_text(e: OSError) -> str:
    """ "PATH: no space left on device", from an OSError that names its file (else its own text)."""
    if e.filename is None or e.strerror is None:
        return str(e)
    return f"{e.filename}: {e.strerror[0].lower()}{e.strerror[1:]}"
