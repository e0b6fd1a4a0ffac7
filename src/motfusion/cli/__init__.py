"""The `motfusion` command line.

Each subcommand is a `Command` (cli/common.py) in the COMMANDS of one module: a help line, a function
that adds its arguments to its argparse subparser, and a function that runs it. A new subcommand is
one more entry. Mistakes a user can make (bad config or data, missing files, unusable checkpoint,
a path that cannot be written, a full disk) end with one line, `motfusion: error: ...`, and exit
status 2. docs/GUARANTEES.md lists what survives what.
"""

from __future__ import annotations

import argparse
import os
import sys

from motfusion.cli import auxiliary, evaluate, generate, train
from motfusion.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError

PROG = "motfusion"
USER_ERRORS = (ConfigError, CheckpointError, NonFiniteLossError, FileNotFoundError, DataError)
COMMANDS = {**evaluate.COMMANDS, **generate.COMMANDS, **train.COMMANDS, **auxiliary.COMMANDS}


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
    except OSError as e:  # the file system said no (read-only, full, a file in the way): path and cause
        print(f"{PROG}: error: {os_error_text(e)}", file=sys.stderr)
        return 2
    return status or 0


def os_error_text(e: OSError) -> str:
    """"PATH: no space left on device", from an OSError that names its file (else its own text)."""
    if e.filename is None or e.strerror is None:
        return str(e)
    return f"{e.filename}: {e.strerror[0].lower()}{e.strerror[1:]}"
