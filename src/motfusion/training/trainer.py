"""The training loop: packed batches -> TransfusionObjective -> AdamW, with exact resume.

Everything a step depends on is either a pure function of (config, step) or saved in the
checkpoint: the weights, the optimizer state, the document index the packer has reached, and the
state of the generator that draws diffusion timesteps and noise. So N steps, then `resume=True`
and N more, gives the same per-step losses as 2N steps in one go (bitwise on CPU).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from motfusion.config import Config, ConfigError, TrainConfig
from motfusion.data.pipeline import make_packer
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.sequence import MODALITIES, Batch, Packer
from motfusion.tokenizer import build_tokenizer
from motfusion.training.checkpoint import (
    CheckpointError,
    check_resumable,
    checkpoint_step,
    latest_checkpoint,
    load_config,
    load_train_state,
    load_weights,
    save_checkpoint,
    write_json,
)
from motfusion.training.logging import TrainLogger


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became inf/nan; the step was not applied."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # the last completed step
    checkpoint: Path | None  # the newest checkpoint
    elapsed_s: float  # training wall time, earlier segments of a resumed run included
    metrics: list[dict[str, Any]] = field(default_factory=list)  # the records this call logged


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"train.device={spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec!r} but CUDA is not available; use train.device=cpu")
    return device


def derive_seed(seed: int, stream: str) -> int:
    """An independent seed for a named random stream of the run."""
    return int(np.random.SeedSequence([seed, zlib.crc32(stream.encode())]).generate_state(1)[0])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the 2-D weight matrices of linear layers only.

    Norm gains and biases are not decayed (as in GPT-2 and Llama). Embedding rows are not decayed
    either: AdamW shrinks every row every step, so the rows of tokens that rarely appear (most of a
    byte vocabulary, the specials) would drift to zero for no reason coming from the data.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, tcfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))


def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Learning rate of step `step` (1-based): linear warmup, then cosine decay to min_lr at train.steps."""
    if step <= tcfg.warmup:
        return tcfg.lr * step / tcfg.warmup
    progress = min(1.0, (step - tcfg.warmup) / max(1, tcfg.steps - tcfg.warmup))
    return tcfg.min_lr + 0.5 * (tcfg.lr - tcfg.min_lr) * (1 + math.cos(math.pi * progress))


def token_counts(batch: Batch) -> dict[str, int]:
    """Real (non-padding) positions per input modality: {"tokens/text": ..., "tokens/image": ...}."""
    real = batch.doc >= 0  # (B, T)
    return {f"tokens/{name}": int(((batch.modality == i) & real).sum()) for name, i in MODALITIES.items()}


def train_step(model: nn.Module, objective: TransfusionObjective, optimizer: torch.optim.Optimizer,
               batch: Batch, generator: torch.Generator, lr: float, grad_clip: float) -> dict[str, float]:
    """One optimizer update; returns the step's loss breakdown and its gradient norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss, parts = objective(model, batch, generator)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    # The step's only host sync: every number we log, and the finiteness check, in one transfer.
    values = torch.stack([loss.detach(), parts["loss/text"], parts["loss/image"], grad_norm]).tolist()
    stats = dict(zip(("loss", "loss/text", "loss/image", "grad_norm"), values))
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteLossError(
            "non-finite " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items())
            + "; the step was not applied. Lower train.lr, raise train.warmup or lower train.grad_clip")
    optimizer.step()
    return stats


@dataclass
class Run:
    """The mutable state of a training run: what the loop advances and a checkpoint restores."""

    model: TransfusionModel
    optimizer: torch.optim.AdamW
    objective: TransfusionObjective
    generator: torch.Generator  # diffusion timesteps and noise
    packer: Packer
    device: torch.device
    step: int = 0
    elapsed_s: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights, as tensors and plain containers (loads with weights_only=True)."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"step": self.step, "elapsed_s": self.elapsed_s, "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "packer": self.packer.state_dict(), "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.elapsed_s = int(state["step"]), float(state["elapsed_s"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.packer.load_state_dict(state["packer"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)


def new_run(cfg: Config, device: torch.device) -> Run:
    """Model, optimizer and data for step 0; the weights are initialized under torch.manual_seed(train.seed)."""
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(cfg.train.seed)
    model = TransfusionModel(cfg.model, tokenizer.vocab_size).to(device).train()
    generator = torch.Generator(device=device).manual_seed(derive_seed(cfg.train.seed, "noise"))
    return Run(model=model, optimizer=build_optimizer(model, cfg.train), objective=TransfusionObjective(cfg.objective),
               generator=generator, packer=make_packer(cfg, tokenizer, "train"), device=device)


def _resume_point(run_dir: Path, resume: bool) -> Path | None:
    ckpt = latest_checkpoint(run_dir)
    if resume and ckpt is None:
        raise CheckpointError(f"nothing to resume: {run_dir} holds no checkpoint")
    if not resume and ckpt is not None:
        raise CheckpointError(f"{run_dir} already holds checkpoints (latest {ckpt.name}); "
                              "pass --resume to continue it, or choose another --out")
    return ckpt


def _record(step: int, stats: dict[str, float], lr: float, dt: float, counts: dict[str, int],
            batch_tokens: int, elapsed_s: float) -> dict[str, Any]:
    # tokens_per_s counts every (B, T) position the model computed; per modality, only real tokens.
    record: dict[str, Any] = {"step": step, **stats, "lr": lr, "dt_ms": 1000 * dt, "tokens_per_s": batch_tokens / dt}
    for key, n in counts.items():
        record[key] = n
        record[key.replace("tokens/", "tokens_per_s/")] = n / dt
    record["elapsed_s"] = elapsed_s
    return record


def _loop(run: Run, cfg: Config, run_dir: Path, log: TrainLogger,
          ckpt: Path | None) -> tuple[list[dict[str, Any]], Path | None]:
    """Steps until train.steps; returns the logged records and the newest checkpoint."""
    tcfg = cfg.train
    history = []
    start, base_elapsed = time.perf_counter(), run.elapsed_s
    while run.step < tcfg.steps:
        t0 = time.perf_counter()
        batch = run.packer.next_batch()  # (B, T), built on the host
        counts = token_counts(batch)
        step, lr = run.step + 1, lr_at(run.step + 1, tcfg)
        stats = train_step(run.model, run.objective, run.optimizer, batch.to(run.device), run.generator, lr, tcfg.grad_clip)
        dt = time.perf_counter() - t0
        run.step, run.elapsed_s = step, base_elapsed + time.perf_counter() - start
        log.advance()
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            history.append(_record(step, stats, lr, dt, counts, batch.tokens.numel(), run.elapsed_s))
            log.log(history[-1])
        if (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or step == tcfg.steps:
            ckpt = save_checkpoint(run_dir, step, run.model, cfg, run.state_dict(), tcfg.keep_checkpoints)
    return history, ckpt


def train(cfg: Config, out_dir: Path, resume: bool = False) -> TrainResult:
    """Train `cfg` into `out_dir` (config.json, metrics.jsonl, checkpoints/), or continue it with `resume`.

    A resumed run may raise train.steps: the LR schedule follows the current config. The model
    section must match the checkpoint's.
    """
    cfg.validate()
    run_dir = Path(out_dir)
    ckpt = _resume_point(run_dir, resume)
    device = resolve_device(cfg.train.device)
    run = new_run(cfg, device)
    notes = []
    if ckpt is not None:
        changed = check_resumable(load_config(ckpt), cfg)
        load_weights(run.model, ckpt)
        run.load_state_dict(load_train_state(ckpt))
        notes.append(f"resuming from {ckpt} (step {checkpoint_step(ckpt)})"
                     + (f"; changed since: {', '.join(changed)}" if changed else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", cfg.to_dict())
    with TrainLogger(run_dir, cfg.train.steps, run.step) as log:
        for line in [_describe(run, cfg, run_dir), *notes]:
            log.info(line)
        history, ckpt = _loop(run, cfg, run_dir, log, ckpt)
        log.info(f"done: step {run.step}, {run.elapsed_s:.1f} s of training, checkpoint {ckpt}")
    return TrainResult(run_dir=run_dir, step=run.step, checkpoint=ckpt, elapsed_s=run.elapsed_s, metrics=history)


def _describe(run: Run, cfg: Config, run_dir: Path) -> str:
    m, t = run.model, cfg.train
    return (f"recipe {cfg.recipe}: {m.num_params() / 1e6:.2f}M params ({m.num_params(non_embedding=True) / 1e6:.2f}M "
            f"non-embedding), untie={','.join(cfg.model.untie) or 'none'} | device {run.device} | "
            f"{t.batch_size}x{t.seq_len} tokens/step | {t.steps} steps -> {run_dir}")
