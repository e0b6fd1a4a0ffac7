"""A markdown table of demo runs: the sweep and seed tables of docs/RESULTS.md.

Each row reads the run's report/metrics.json (what `motfusion demo` measured) and, where present,
the metrics of `motfusion eval --ckpt RUN --n 256 --out RUN/eval_n256.json`, which replace the
report's (the column n says which).

    python benchmarks/demo_table.py runs/sweep/*             # one row per run directory
    python benchmarks/demo_table.py --spread runs/seed*      # and a mean +- sd row (seeds of one recipe)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COLUMNS = (
    "geneval_single",
    "geneval",
    "caption_accuracy",
    "geneval_single/shape",
    "geneval_single/position",
    "geneval_single/size",
    "geneval_single/objects",
)


def row(run: Path) -> list[str]:
    m = json.loads((run / "report" / "metrics.json").read_text())
    n = m.get("n_captions", 64)
    if (run / "eval_n256.json").is_file():
        m, n = {**m, **json.loads((run / "eval_n256.json").read_text())}, 256
    return [run.name, str(m["steps"]), str(n), *(f"{m[k]:.3f}" for k in COLUMNS), f"{m['train_seconds']:.0f}"]


def main(runs: list[str], spread: bool) -> None:
    header = ["run", "steps", "n", *COLUMNS, "train s"]
    rows = [row(Path(r)) for r in runs if (Path(r) / "report" / "metrics.json").is_file()]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if spread and len(rows) > 1:
        cols = list(zip(*rows))
        spread = [
            f"{statistics.mean(map(float, c)):.3f} ± {statistics.stdev(map(float, c)):.3f}"
            for c in cols[3 : 3 + len(COLUMNS)]
        ]
        print("| mean ± sd | | | " + " | ".join(spread) + " | |")


if __name__ == "__main__":
    args = sys.argv[1:]
    main([a for a in args if a != "--spread"], "--spread" in args)
