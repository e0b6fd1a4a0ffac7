"""Training logs: RUN/metrics.jsonl, one JSON object per logged step, and console progress.

On a terminal the console shows a tqdm bar whose postfix carries the latest logged numbers;
otherwise (CI, a file, a notebook cell) it prints one dense line per logged step, like nanoGPT:

    step 40/600 | loss 3.2100 | text 2.1000 | image 0.2200 | lr 1.2e-03 | norm 0.41 | 812 tok/s | 245 ms

With `tensorboard=True` the same numbers also go to TensorBoard event files in the run directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. Each is written as one line with its newline, so text after the
    last newline is a record cut short by a kill mid-write: it is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def format_line(record: dict[str, Any], total_steps: int) -> str:
    parts = "".join(f" | {k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss/"))  # per modality
    line = (f"step {record['step']}/{total_steps} | loss {record['loss']:.4f}{parts}"
            f" | lr {record['lr']:.1e} | norm {record['grad_norm']:.2f}"
            f" | {record['tokens_per_s']:.0f} tok/s | {record['dt_ms']:.0f} ms")
    if "mfu" in record:
        line += f" | MFU {100 * record['mfu']:.1f}%"
    return line + (" | skipped" if record.get("skipped") else "")


class TrainLogger:
    """Appends records to metrics.jsonl and reports progress on `stream`.

    `start_step` is the step the run (re)starts from: records after it are dropped from the file (and
    from TensorBoard's view), because a resumed run redoes those steps and logs them again.
    """

    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, stream: TextIO | None = None,
                 tensorboard: bool = False):
        self.path = Path(run_dir) / METRICS_FILE
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = self.path.open("a")
        self.tensorboard = _summary_writer(Path(run_dir), start_step) if tensorboard else None
        self.bar = None
        if self.stream.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])
        if self.bar is None:
            print(format_line(record, self.total_steps), file=self.stream, flush=True)
        else:
            self.bar.set_postfix_str(format_line(record, self.total_steps).split(" | ", 1)[1], refresh=False)

    def info(self, text: str) -> None:
        if self.bar is None:
            print(text, file=self.stream, flush=True)
        else:
            self.bar.write(text, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.file.close()

    def __enter__(self) -> "TrainLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _summary_writer(run_dir: Path, start_step: int) -> Any:
    """A SummaryWriter into the run directory. On resume, TensorBoard hides the earlier events of the
    steps after `start_step` (`purge_step`), which the resumed run writes again."""
    from torch.utils.tensorboard import (
        SummaryWriter,  # imports tensorboard: only when asked for
    )
    return SummaryWriter(log_dir=str(run_dir), purge_step=start_step + 1 if start_step else None)
