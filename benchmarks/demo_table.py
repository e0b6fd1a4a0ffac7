"""A markdown table of demo runs (their report/metrics.json): the sweep and seed tables of docs/RESULTS.md.

    python benchmarks/demo_table.py runs/sweep/*             # one row per run directory
    python benchmarks/demo_table.py --spread runs/seed*      # and a mean +- sd row (seeds of one recipe)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COLUMNS = ("geneval_single", "geneval", "caption_accuracy", "geneval_single/color", "geneval_single/shape",
           "geneval_single/objects")


def row(run: Path) -> list[str]:
    m = json.loads((run / "report" / "metrics.json").read_text())
    return [run.name, str(m["steps"]), *(f"{m[k]:.3f}" for k in COLUMNS), f"{m['train_seconds']:.0f}"]


def main(runs: list[str], spread: bool) -> None:
    header = ["run", "steps", *COLUMNS, "train s"]
    rows = [row(Path(r)) for r in runs if (Path(r) / "report" / "metrics.json").is_file()]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if spread and len(rows) > 1:
        cols = list(zip(*rows))
        spread = [f"{statistics.mean(map(float, c)):.3f} ± {statistics.stdev(map(float, c)):.3f}"
                  for c in cols[2:2 + len(COLUMNS)]]
        print("| mean ± sd | | " + " | ".join(spread) + " | |")


if __name__ == "__main__":
    args = sys.argv[1:]
    main([a for a in args if a != "--spread"], "--spread" in args)
