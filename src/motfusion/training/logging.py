"""Training logs: RUN/metrics.jsonl, one JSON object per logged step, and console progress.

On a terminal the console shows a tqdm bar whose postfix carries the latest logged numbers;
otherwise (CI, a file, a notebook cell) it prints one dense line per logged step, like nanoGPT:

    step 40/600 | loss 3.2100 | text 2.1000 | image 0.2200 | lr 1.2e-03 | norm 0.41 | 812 tok/s | 245 ms

The numbers go through a Tracker, which every trainer shares (the auxiliary ones through
train_loop's on_log): metrics.jsonl always, and as the run's TrackingConfig asks, TensorBoard
event files in the run directory and a Weights & Biases run (its files in RUN/wandb/; WANDB_MODE
picks online or offline). The W&B run id is kept in RUN/wandb-id, so a resumed run continues it.

metrics.jsonl is append-only while a run trains. On resume it is cut back to the resumed step by
writing the kept records to a temporary file, fsyncing it and renaming it over the old one, so a
kill at any moment leaves the old history or the new one whole. A last line torn by a kill is
dropped (and said so); a damaged line anywhere else stops with its line number.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from motfusion.config import TrackingConfig
from motfusion.errors import CheckpointError, ConfigError
from motfusion.training.files import write_atomic, write_error

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb-id"
log = logging.getLogger("motfusion.training")


def parse_metrics(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The records of a metrics.jsonl, and a note when a torn last line was dropped.

    Each record is written as one line with its newline, so a last line that does not parse (or has
    no newline) is a record cut short by a kill mid-write: it is dropped. A line that does not parse
    elsewhere is damage no kill makes: CheckpointError naming the line."""
    path = Path(path)
    if not path.is_file():
        return [], None
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    lines = text.split("\n")  # the last item is "" when the file ends with a newline
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    records, note = [], None
    for k, (number, line) in enumerate(numbered):
        record = _record(line)
        if record is not None:
            records.append(record)
        elif k == len(numbered) - 1:
            note = f"{path}:{number}: dropped a torn last record (a write cut short)"
        else:
            raise CheckpointError(
                f"{path}:{number} is not a metrics record (a JSON object with a step); delete or "
                "repair that line, the other records are intact"
            )
    return records, note


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (see parse_metrics); a dropped torn last line is logged."""
    records, note = parse_metrics(path)
    if note:
        log.warning(note)
    return records


def format_line(record: dict[str, Any], total_steps: int) -> str:
    parts = "".join(f" | {k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss/"))  # per modality
    line = (
        f"step {record['step']}/{total_steps} | loss {record['loss']:.4f}{parts}"
        f" | lr {record['lr']:.1e} | norm {record['grad_norm']:.2f}"
        f" | {record['tokens_per_s']:.0f} tok/s | {record['dt_ms']:.0f} ms"
    )
    if "mfu" in record:
        line += f" | MFU {100 * record['mfu']:.1f}%"
    return line + (" | skipped" if record.get("skipped") else "")


class Tracker:
    """Where a run's records go: RUN/metrics.jsonl, and TensorBoard and W&B as `tracking` asks.

    `start_step` is the step the run (re)starts from: records after it are dropped from the file (and
    from TensorBoard's view), because a resumed run redoes those steps and logs them again. `config`
    is the run's config as a dict, shown by W&B. A missing wandb package is a ConfigError raised
    before anything is written.
    """

    def __init__(
        self,
        run_dir: Path,
        start_step: int = 0,
        tracking: TrackingConfig | None = None,
        config: dict[str, Any] | None = None,
    ):
        tracking = tracking or TrackingConfig()
        wandb = _import_wandb(tracking) if tracking.wandb else None
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        for leftover in run_dir.glob(f".tmp-{METRICS_FILE}-*"):  # a rewrite killed before its rename
            leftover.unlink()
        records, self.note = parse_metrics(self.path)
        kept = [r for r in records if r["step"] <= start_step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        write_atomic(self.path, lambda f: f.write(text.encode()))
        self.file = self.path.open("a")
        self.tensorboard = _summary_writer(run_dir, start_step) if tracking.tensorboard else None
        self.wandb = _wandb_run(wandb, run_dir, start_step, tracking, config) if wandb else None

    def log(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # e.g. a full disk: the error names no file of its own
            raise write_error(e, f"metrics to {self.path}") from None
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrainLogger(Tracker):
    """The main trainer's log: a Tracker (see it for `start_step`, `tracking`, `config`) that also
    reports progress on `stream`, a tqdm bar on a terminal, else one line per logged step."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int = 0,
        stream: TextIO | None = None,
        tracking: TrackingConfig | None = None,
        config: dict[str, Any] | None = None,
    ):
        super().__init__(run_dir, start_step, tracking, config)
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.bar = None
        if self.stream.isatty():
            self.bar = tqdm(
                total=total_steps, initial=start_step, file=self.stream, unit="step", dynamic_ncols=True
            )
        if self.note:
            self.info(self.note)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        super().log(record)
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
        super().close()


def _summary_writer(run_dir: Path, start_step: int) -> Any:
    """A SummaryWriter into the run directory. On resume, TensorBoard hides the earlier events of the
    steps after `start_step` (`purge_step`), which the resumed run writes again."""
    from torch.utils.tensorboard import (
        SummaryWriter,  # imports tensorboard: only when asked for
    )

    return SummaryWriter(log_dir=str(run_dir), purge_step=start_step + 1 if start_step else None)


def _import_wandb(tracking: TrackingConfig) -> Any:
    try:
        import wandb  # an optional extra: only when asked for
    except ImportError:
        raise ConfigError(
            f"{tracking.key_prefix}wandb needs the wandb package: pip install 'motfusion[wandb]'"
        ) from None
    return wandb


def _wandb_run(
    wandb: Any, run_dir: Path, start_step: int, tracking: TrackingConfig, config: dict[str, Any] | None
) -> Any:
    """A W&B run writing into RUN/wandb. Its id lives in RUN/wandb-id: a resumed run (start_step > 0)
    continues the run of that id; a fresh one starts a new id, so a reused directory never appends
    to an old history. The steps a resumed run redoes were logged before its kill: online, W&B
    ignores those at or below the last step it has."""
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if start_step and id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(4)
        write_atomic(id_file, lambda f: f.write(run_id.encode()))
    return wandb.init(
        project=tracking.wandb_project,
        name=tracking.wandb_run or run_dir.resolve().name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config or {},
    )
