"""The one LR schedule, and the small training loop the auxiliary models share (VAE, VQ-VAE,
classifier, CLIP): AdamW, warmup + cosine, gradient clipping, a progress bar (a terminal's
stderr only), a log line and a record for `on_log` every `log_every` steps, and a stop on the
first non-finite loss or gradient. The trainers pass a logging.Tracker's `log` as `on_log`, so
their records reach metrics.jsonl, TensorBoard and W&B as the main trainer's do. The main trainer
(trainer.py) has its own loop (resume, ranks, checkpoints) but the same schedule.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from motfusion.errors import NonFiniteLossError

# step (1-based) -> (loss, named parts to log: tensors or floats)
StepLoss = Callable[[int], tuple[torch.Tensor, dict[str, Any]]]


def cosine_lr(step: int, *, lr: float, steps: int, warmup: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate of step `step` (1-based): linear warmup to `lr` over `warmup` steps, then cosine
    decay to `min_lr` at step `steps`."""
    if step <= warmup:
        return lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@dataclass(kw_only=True)
class LoopConfig:
    name: str  # the model, first word of each log line
    steps: int
    lr: float
    warmup: int = 0
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0  # for parameters not in a group that sets its own
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping (the norm is still measured)
    log_every: int = 100

    def lr_at(self, step: int) -> float:
        return cosine_lr(step, lr=self.lr, steps=self.steps, warmup=self.warmup, min_lr=self.min_lr)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    parts: dict[str, Any],
    lr: float,
    grad_clip: float = 0.0,
    name: str = "",
) -> dict[str, float]:
    """Backward, clip, and apply one update at `lr`; -> {loss, *parts, grad_norm}.

    A non-finite loss, part or gradient norm raises NonFiniteLossError before the update, so the
    weights stay those of the last good step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    values = torch.stack(
        [
            torch.as_tensor(v, dtype=torch.float32, device=loss.device).detach()
            for v in (loss, *parts.values(), grad_norm)
        ]
    ).tolist()  # one device sync
    stats = dict(zip(("loss", *parts, "grad_norm"), values))
    if not all(map(math.isfinite, values)):
        raise NonFiniteLossError(
            f"non-finite {name} loss {stats['loss']:.4g} (gradient norm {stats['grad_norm']:.4g}) "
            f"at lr {lr:.2e}; lower the lr or raise the warmup",
            stats,
        )
    optimizer.step()
    return stats


def train_loop(
    params: Iterable[Any],
    step_loss: StepLoss,
    cfg: LoopConfig,
    log: Callable[[str], None] | None = functools.partial(print, flush=True),
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """`cfg.steps` AdamW updates of `params` (tensors, or param groups) on `step_loss(step)`.

    Every `cfg.log_every` steps and at the last, `on_log` gets that step's record and `log` one line.
    Returns every step's record: step, loss, the parts, grad_norm, lr, dt_ms, elapsed_s."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    with tqdm(total=cfg.steps, desc=cfg.name, unit="step", disable=None, dynamic_ncols=True) as bar:  # stderr
        for step in range(1, cfg.steps + 1):
            t0, lr = time.perf_counter(), cfg.lr_at(step)
            loss, parts = step_loss(step)
            record = {
                "step": step,
                **optimizer_step(optimizer, loss, parts, lr, cfg.grad_clip, cfg.name),
                "lr": lr,
            }
            now = time.perf_counter()
            record.update(dt_ms=1000 * (now - t0), elapsed_s=now - start)
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                if on_log is not None:
                    on_log(record)
                if log is not None:
                    with tqdm.external_write_mode():  # the line above the bar, not through it
                        log(log_line(cfg, history))
    return history


def log_line(cfg: LoopConfig, history: list[dict[str, float]]) -> str:
    """The last step's numbers, with the loss also averaged over the last `log_every` steps."""
    record, recent = history[-1], [r["loss"] for r in history[-cfg.log_every :]]
    parts = [
        f"{k} {v:.4g}"
        for k, v in record.items()
        if k not in ("step", "loss", "grad_norm", "lr", "dt_ms", "elapsed_s")
    ]
    return " | ".join(
        [
            f"{cfg.name} step {record['step']}/{cfg.steps}",
            f"loss {record['loss']:.4f} (mean {sum(recent) / len(recent):.4f})",
            *parts,
            f"lr {record['lr']:.1e}",
            f"norm {record['grad_norm']:.2f}",
            f"{record['dt_ms']:.0f} ms",
            f"{record['elapsed_s']:.0f} s",
        ]
    )
