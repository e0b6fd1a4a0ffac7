"""`motfusion serve`: the web playground of serve.py over one checkpoint."""

from __future__ import annotations

import argparse
import os
import sys

from motfusion.cli.common import Command, add_ckpt_argument, add_device_argument, device_of
from motfusion.errors import ConfigError
from motfusion.pipeline import MotFusion
from motfusion.serve import run


def serve_arguments(p: argparse.ArgumentParser) -> None:
    add_ckpt_argument(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: this machine only; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--port", type=int, default=7860, help="port to listen on; 0 picks a free one")
    add_device_argument(p)


def run_serve(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port={args.port}: use 0 to 65535 (0 picks a free port)")
    run(MotFusion.load(args.ckpt, device_of(args)), args.host, args.port, name=str(args.ckpt))
    # Ctrl-C stopped the server. Leave without the interpreter's teardown: with the request threads
    # (daemons) still alive it sometimes aborted in C++ ("terminate called without an active
    # exception", exit -6) after "stopped" was printed. Serving writes nothing that needs it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


COMMANDS = {
    "serve": Command(serve_arguments, run_serve),
}
