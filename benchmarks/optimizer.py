"""AdamW against Muon (train.optimizer) on the demo recipe's train step: what Muon's Newton-Schulz
iterations cost.

    python benchmarks/optimizer.py [--repeats 6] [--threads 2] [--precision bf16] [--out benchmarks/results]

One optimizer update of the demo recipe (forward, Transfusion loss, backward, clipping, the
optimizer) on the same packed batches, one step of each optimizer in turn in one process
(bench.interleaved_ms), so load on the host hits both alike. Writes OUT/optimizer.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import interleaved_ms, machine, setup  # noqa: E402

BATCHES = 4
# AdamW on every weight, against Muon as the demo recipe has it (backbone matrices, U-Net filters).
OPTIMIZERS = {"adamw": ["train.optimizer=adamw", "train.muon_convs=false"], "muon": ["train.optimizer=muon"]}


def measure(repeats: int, precision: str) -> dict[str, float]:
    """Median ms of a demo-recipe train step with each optimizer, one step of each in turn (each
    setup rotates through its own BATCHES batches), after a warmup of BATCHES steps."""
    steps = {name: setup("demo", overrides, batches=BATCHES).step for name, overrides in OPTIMIZERS.items()}
    return interleaved_ms(
        {name: lambda step=step: step(precision) for name, step in steps.items()}, BATCHES, repeats * BATCHES
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ms = measure(args.repeats, args.precision)
    step_ms = {k: round(v, 1) for k, v in ms.items()}
    result = {
        "machine": machine(),
        "threads": args.threads,
        "precision": args.precision,
        "step_ms": step_ms,
        "muon_over_adamw": round(step_ms["muon"] / step_ms["adamw"], 3),  # as a reader recomputes it
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimizer.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"demo recipe train step, {args.threads} threads, {args.precision}, medians of {args.repeats * BATCHES}\n"
    )
    print("| optimizer | step ms |\n|---|---|")
    for name in OPTIMIZERS:
        print(f"| {name} | {ms[name]:.0f} |")
    print(f"\nmuon / adamw: {result['muon_over_adamw']:.2f}")


if __name__ == "__main__":
    main()
