"""The training loop: packed batches -> TransfusionObjective -> AdamW, with exact resume.

Everything a step depends on is either a pure function of (config, step) or saved in the
checkpoint: the weights, the optimizer state and the document index the packer has reached; the
diffusion timesteps and noise of step s come from a generator seeded by (train.seed, s). So N
steps, then `resume=True` and N more, gives the same per-step losses as 2N steps in one go
(bitwise on CPU).

Under torchrun (training/distributed.py) the same loop runs on every rank: train.batch_size is the
global batch, each rank trains on its rows, the losses are means over the global batch and the
noise of each image does not depend on the number of ranks, so K ranks give the losses of one
process (up to float rounding). Rank 0 logs; checkpoints are collective (training/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from motfusion.codecs.image import apply_image_repr
from motfusion.config import Config, TrainConfig
from motfusion.data.pipeline import make_packer, training_texts
from motfusion.errors import CheckpointError, ConfigError, NonFiniteLossError
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import GlobalBatch, TransfusionObjective
from motfusion.sequence import Batch, Prefetcher
from motfusion.tokenizer import (
    TOKENIZER_FILE,
    build_tokenizer,
    train_bpe,
    trained_vocab,
)
from motfusion.training.checkpoint import (
    CHECKPOINTS,
    CONFIG_FILE,
    STATE_FILE,
    check_resumable,
    checkpoint_step,
    config_diff,
    has_ema,
    latest_checkpoint,
    load_config,
    load_ema,
    load_optimizer,
    load_train_state,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from motfusion.training.distributed import (
    Silent,
    World,
    all_reduce_sum,
    any_rank,
    barrier,
    cleanup,
    init_distributed,
    locate,
)
from motfusion.training.ema import EMA
from motfusion.training.files import RunLock, check_writable_dir, write_json
from motfusion.training.flops import BatchFlops, FlopCounter, peak_flops
from motfusion.training.logging import TrainLogger
from motfusion.training.loop import cosine_lr
from motfusion.training.muon import MuonAdamW
from motfusion.training.parallelize import autocast, parallel_mode, parallelize, resolve_precision
from motfusion.training.signals import StopSignal


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # the last completed step
    checkpoint: Path | None  # the newest checkpoint
    elapsed_s: float  # training wall time, earlier segments of a resumed run included
    metrics: list[dict[str, Any]] = field(default_factory=list)  # the records this call logged
    stopped_by: str | None = None  # "SIGTERM" or "SIGINT" when a signal ended the run before train.steps


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


def muon_groups(model: nn.Module, weight_decay: float, convs: bool = False) -> list[dict[str, Any]]:
    """param_groups, with the backbone blocks' weight matrices (attention and FFN, every tower) in a
    group of their own that Muon steps (training/muon.py); `convs`: the U-Net's conv filters too,
    all but the stem (it reads pixels) and the output (zero-initialised)."""
    hidden = {id(p) for name, p in model.named_parameters() if "backbone.blocks." in name and p.ndim == 2}
    if convs:
        hidden |= {
            id(p)
            for name, p in model.named_parameters()
            if name.startswith("image.")
            and p.ndim == 4
            and not name.startswith(("image.stem.", "image.proj_out."))
        }
    groups = []
    for group in param_groups(model, weight_decay):
        for muon in (True, False):
            params = [p for p in group["params"] if (id(p) in hidden) == muon]
            if params:
                groups.append({**group, "params": params, "muon": muon})
    return groups


def build_optimizer(model: nn.Module, tcfg: TrainConfig) -> torch.optim.Optimizer:
    """train.optimizer: AdamW on every parameter, or Muon on the backbone's weight matrices (and with
    train.muon_convs the U-Net's filters) and AdamW on the rest (same lr, schedule and weight decay)."""
    try:
        if tcfg.optimizer == "muon":
            return MuonAdamW(
                muon_groups(model, tcfg.weight_decay, tcfg.muon_convs),
                lr=tcfg.lr,
                betas=(tcfg.beta1, tcfg.beta2),
            )
        return torch.optim.AdamW(
            param_groups(model, tcfg.weight_decay), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), fused=True
        )  # one kernel for all parameters: MoT has 2-3x dense's tensors
    except ValueError as e:  # torch's own range checks
        raise ConfigError(
            f"the optimizer rejects train.lr={tcfg.lr}, train.beta1={tcfg.beta1}, "
            f"train.beta2={tcfg.beta2}, train.weight_decay={tcfg.weight_decay}: {e}"
        ) from None


def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Learning rate of step `step` (1-based): linear warmup, then cosine decay to min_lr at train.steps."""
    return cosine_lr(step, lr=tcfg.lr, steps=tcfg.steps, warmup=tcfg.warmup, min_lr=tcfg.min_lr)


def train_step(
    model: nn.Module,
    objective: TransfusionObjective,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    generator: torch.Generator,
    lr: float,
    grad_clip: float,
    *,
    whole: GlobalBatch | None = None,
    world_size: int = 1,
    precision: str = "fp32",
) -> dict[str, float]:
    """One optimizer update; returns the step's loss breakdown and its gradient norm before clipping.

    With several ranks, `model` is parallelized (ddp or fsdp, which average gradients over ranks),
    `batch` holds this rank's rows and `whole` places them in the global batch; the stats returned
    are the global batch's, the same on every rank."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    with autocast(precision, batch.tokens.device):
        loss, parts = objective(model, batch, generator, whole)
    # The loss is this rank's share of the global mean; ranks average gradients, so scaling by the
    # world size makes that average the gradient of the global mean.
    (loss * world_size).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    # The step's only host sync: every number we log, and the finiteness check, in one transfer.
    shares = all_reduce_sum(torch.stack([loss.detach(), *parts.values()]))  # global means
    values = torch.cat([shares, grad_norm.reshape(1)]).tolist()
    stats = dict(zip(("loss", *parts, "grad_norm"), values))
    if not all(math.isfinite(v) for v in values):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            "non-finite "
            + ", ".join(f"{k} {v:.4g}" for k, v in stats.items())
            + "; the step was not applied. Lower train.lr, raise train.warmup or lower train.grad_clip",
            stats,
        )
    optimizer.step()
    return stats


@dataclass
class Run:
    """The mutable state of a training run: what the loop advances and a checkpoint restores."""

    model: TransfusionModel  # parallelized in place (training/parallelize.py)
    optimizer: torch.optim.AdamW
    objective: TransfusionObjective
    generator: torch.Generator  # diffusion timesteps and noise, reseeded every step
    packer: Prefetcher  # builds the next batch while this one trains
    device: torch.device
    world: World
    mode: str  # train.parallel resolved: none, ddp or fsdp
    ema: EMA | None = None  # the weights' moving average (train.ema > 0)
    step: int = 0
    elapsed_s: float = 0.0
    flops: float = 0.0  # training FLOPs so far (see training/flops.py)
    bad_steps: int = 0  # non-finite steps in a row, up to the current one

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights, as tensors and plain containers (loads with weights_only=True)."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "flops": self.flops,
            "bad_steps": self.bad_steps,
            "packer": self.packer.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.elapsed_s = int(state["step"]), float(state["elapsed_s"])
        self.flops, self.bad_steps = float(state.get("flops", 0.0)), int(state.get("bad_steps", 0))
        self.packer.load_state_dict(state["packer"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)


TOKENIZER_TEXTS = 20_000  # training documents whose text a bpe:N tokenizer learns from


def prepare_tokenizer(cfg: Config, run_dir: Path, world: World) -> None:
    """data.tokenizer=bpe:N: train it on the run's first training documents into RUN/tokenizer.json,
    once (a resumed run keeps its own). Rank 0 trains; the others wait for the file."""
    n = trained_vocab(cfg.data.tokenizer)
    path = run_dir / TOKENIZER_FILE
    if n is not None and world.is_main and not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{TOKENIZER_FILE}")
        if cfg.train.init_from:  # the weights' own tokenizer: its embeddings are for those tokens
            source = resolve_checkpoint(Path(cfg.train.init_from)) / TOKENIZER_FILE
            if not source.is_file():
                raise CheckpointError(
                    f"train.init_from={cfg.train.init_from}: {source} is missing, but "
                    f"data.tokenizer={cfg.data.tokenizer} needs the tokenizer those weights were trained with"
                )
            shutil.copyfile(source, tmp)
        else:
            train_bpe(training_texts(cfg, TOKENIZER_TEXTS), n, tmp)
        tmp.replace(path)
    barrier()


def new_run(cfg: Config, world: World, run_dir: Path | None = None) -> Run:
    """Model, optimizer and data for step 0; the weights are initialized under torch.manual_seed(train.seed)
    (the same on every rank), then parallelized (training/parallelize.py). `run_dir` holds the
    tokenizer of data.tokenizer=bpe:N (prepare_tokenizer)."""
    tokenizer = build_tokenizer(cfg.data.tokenizer, run_dir)
    torch.manual_seed(cfg.train.seed)
    model = TransfusionModel(cfg.model, tokenizer.vocab_size).to(world.device).train()
    mode = parallel_mode(cfg.train, world.world_size)
    parallelize(model, cfg.train, world)  # before the optimizer: FSDP replaces the parameters
    return Run(
        model=model,
        optimizer=build_optimizer(model, cfg.train),
        ema=EMA(model, cfg.train.ema, cfg.train.ema_warmup) if cfg.train.ema else None,
        objective=TransfusionObjective(cfg.objective),
        generator=torch.Generator(device=world.device),
        packer=Prefetcher(make_packer(cfg, tokenizer, "train", world.rank, world.world_size)),
        world=world,
        mode=mode,
        device=world.device,
    )


def init_weights(run: Run, source: str) -> str:
    """train.init_from: start from another run's weights (its moving average where it has one: the
    weights it samples with). The optimizer, step, data and moving average start fresh. Returns a
    line for the log."""
    ckpt = resolve_checkpoint(Path(source))
    saved = load_config(ckpt).to_dict()["model"]
    changed = config_diff(saved, dataclasses.asdict(run.model.cfg), "model.")
    if changed:
        raise CheckpointError(
            f"train.init_from={source}: its model differs in {', '.join(changed)}; set those keys as "
            f"in {ckpt / CONFIG_FILE}"
        )
    ema = has_ema(ckpt)
    load_weights(run.model, ckpt, ema=ema)
    if run.ema is not None:
        run.ema.restart()
    return (
        f"weights from {ckpt} ({'moving average' if ema else 'raw weights'}); optimizer and step start fresh"
    )


def _resume_point(run_dir: Path, resume: bool) -> Path | None:
    ckpt = latest_checkpoint(run_dir)
    if resume and ckpt is None:
        raise CheckpointError(f"nothing to resume: {run_dir} holds no checkpoint")
    if not resume and ckpt is not None:
        raise CheckpointError(
            f"{run_dir} already holds checkpoints (latest {ckpt.name}); "
            "pass --resume to continue it, or choose another --out"
        )
    return ckpt


def _record(
    step: int,
    stats: dict[str, float],
    lr: float,
    dt: float,
    counts: dict[str, int],
    batch_tokens: int,
    elapsed_s: float,
) -> dict[str, Any]:
    # tokens_per_s counts every (B, T) position the model computed; per modality, only real tokens.
    record: dict[str, Any] = {
        "step": step,
        **stats,
        "lr": lr,
        "dt_ms": 1000 * dt,
        "tokens_per_s": batch_tokens / dt,
    }
    for key, n in counts.items():
        record[key] = n
        record[key.replace("tokens/", "tokens_per_s/")] = n / dt
    record["elapsed_s"] = elapsed_s
    return record


def _flops_record(
    flops: BatchFlops, cumulative: float, dt: float, peak: float | None, world_size: int
) -> dict[str, float]:
    """FLOPs per token per modality, the step's and the run's FLOPs (all ranks), and MFU where the
    device's peak is known."""
    record = {f"flops_per_token/{m}": v for m, v in flops.per_token().items()}
    record.update(flops=flops.total, cumulative_flops=cumulative)
    if peak is not None:
        record["mfu"] = flops.total / dt / (peak * world_size)
    return record


def _guarded_step(
    run: Run, batch: Batch, whole: GlobalBatch, lr: float, tcfg: TrainConfig, log: TrainLogger
) -> dict[str, float]:
    """train_step, except that a non-finite step is skipped (no update) and counted in run.bad_steps."""
    try:
        stats = train_step(
            run.model,
            run.objective,
            run.optimizer,
            batch,
            run.generator,
            lr,
            tcfg.grad_clip,
            whole=whole,
            world_size=run.world.world_size,
            precision=tcfg.precision,
        )
    except NonFiniteLossError as e:
        run.bad_steps += 1
        log.info(
            f"step {run.step + 1}: skipped, {run.bad_steps} in a row (train.max_bad_steps={tcfg.max_bad_steps}): {e}"
        )
        return {**e.stats, "skipped": 1, "bad_steps": run.bad_steps}
    run.bad_steps = 0
    if run.ema is not None:
        run.ema.update(run.step + 1)
    return {**stats, "skipped": 0, "bad_steps": 0}


def _weights_finite(model: nn.Module) -> bool:
    """No inf or nan in this rank's weights (its shards under FSDP); one host sync."""
    flags = [torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def _unsaveable(
    run: Run, done: int, applied: int, last: bool, ckpt: Path | None
) -> NonFiniteLossError | None:
    """Why the weights must not be checkpointed: an update with a finite loss made them non-finite (a
    broken hyper-parameter), or, at the end of the run, every one of the `done` steps of this process
    was skipped. Collective: every rank gets the same answer."""
    then = f"the last good checkpoint is {ckpt}" if ckpt is not None else "no checkpoint was written"
    if any_rank(not _weights_finite(run.model)):
        return NonFiniteLossError(
            f"step {run.step}: the weights became non-finite although the loss was finite, so "
            "they were not saved; check train.lr, train.beta1, train.beta2, train.weight_decay "
            f"and train.grad_clip; {then}"
        )
    if last and done and not applied:
        return NonFiniteLossError(
            f"all {done} steps up to step {run.step} were skipped (non-finite loss or gradient), "
            f"so nothing was trained; lower train.lr or raise train.warmup; {then}"
        )
    return None


def _too_many_bad_steps(run: Run, ckpt: Path | None) -> NonFiniteLossError:
    then = f"--resume from {ckpt}" if ckpt is not None else "start again"
    return NonFiniteLossError(
        f"stopped at step {run.step}: {run.bad_steps} steps in a row had a non-finite loss or "
        f"gradient (train.max_bad_steps); lower train.lr or raise train.warmup, then {then}"
    )


def _next_batch(packer: Prefetcher) -> Batch:
    try:
        return packer.next_batch()
    except (
        ValueError
    ) as e:  # sequence.Packer: a document longer than train.seq_len, which the config must fix
        if "train.seq_len" not in str(e):
            raise
        raise ConfigError(str(e)) from None


def _loop(
    run: Run, cfg: Config, run_dir: Path, log: TrainLogger, ckpt: Path | None, stop: StopSignal
) -> tuple[list[dict[str, Any]], Path | None]:
    """Steps until train.steps, or until a stop signal (then checkpoints at once).

    Returns the logged records and the newest checkpoint."""
    tcfg = cfg.train
    history = []
    counter, peak = FlopCounter(run.model), peak_flops(run.device)
    start, base_elapsed, first, applied = time.perf_counter(), run.elapsed_s, run.step, 0
    while run.step < tcfg.steps:
        t0 = time.perf_counter()
        batch = _next_batch(run.packer)  # (B / W, T): this rank's rows of the global batch, built on the host
        whole, totals = locate(
            batch, counter.count(batch).as_counts()
        )  # global denominators, tokens and FLOPs
        flops = BatchFlops.from_counts(totals)
        counts = {f"tokens/{m}": n for m, n in flops.tokens.items()}
        step, lr = run.step + 1, lr_at(run.step + 1, tcfg)
        run.generator.manual_seed(derive_seed(tcfg.seed, f"noise/{step}"))
        stats = _guarded_step(run, batch.to(run.device), whole, lr, tcfg, log)
        applied += not stats["skipped"]
        dt = time.perf_counter() - t0
        run.step, run.elapsed_s, run.flops = (
            step,
            base_elapsed + time.perf_counter() - start,
            run.flops + flops.total,
        )
        log.advance()
        if step % tcfg.log_every == 0 or step == tcfg.steps or stats["skipped"]:
            positions = batch.tokens.numel() * run.world.world_size  # (B, T) of the global batch
            history.append(
                {
                    **_record(step, stats, lr, dt, counts, positions, run.elapsed_s),
                    **_flops_record(flops, run.flops, dt, peak, run.world.world_size),
                }
            )
            log.log(history[-1])
        if run.bad_steps >= tcfg.max_bad_steps:
            raise _too_many_bad_steps(run, ckpt)
        stopping = any_rank(stop.received is not None)  # every rank joins the checkpoint and stops together
        if (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or step == tcfg.steps or stopping:
            refusal = _unsaveable(run, step - first, applied, step == tcfg.steps, ckpt)
            if refusal is not None:
                raise refusal
            ckpt = save_checkpoint(
                run_dir,
                step,
                run.model,
                cfg,
                run.state_dict(),
                tcfg.keep_checkpoints,
                optimizer=run.optimizer,
                sharded=run.mode == "fsdp",
                ema=run.ema,
            )
        if stopping:
            break
    return history, ckpt


def train(cfg: Config, out_dir: Path, resume: bool = False) -> TrainResult:
    """Train `cfg` into `out_dir` (config.json, metrics.jsonl, checkpoints/), or continue it with `resume`.

    A resumed run may raise train.steps: the LR schedule follows the current config. The model
    section must match the checkpoint's. The call holds the run directory's lock (checkpoint.RunLock:
    one writer per run), and never checkpoints weights that hold inf or nan (docs/GUARANTEES.md). Under torchrun every process calls this (see the module
    docstring); a checkpoint resumes with any number of processes and any train.parallel.
    """
    apply_image_repr(
        cfg.validate()
    )  # model.image_channels: the image representation's (a VAE's latent channels)
    world = init_distributed(resolve_device(cfg.train.device))
    lock = RunLock(out_dir)
    try:
        _lock_run(lock, world)
        notes = (
            [
                f"took over {lock.path} from process {lock.stale}, which ended without releasing it "
                "(killed or crashed)"
            ]
            if lock.stale
            else []
        )
        result = _train(cfg, Path(out_dir), resume, world, notes)
        barrier()  # no rank closes its connections while another may still be reading from them
        return result
    finally:
        lock.release()
        cleanup(world)


def _lock_run(lock: RunLock, world: World) -> None:
    """Before any work: rank 0 takes the run directory's lock (one writer per run) and proves that
    checkpoints/ takes new files. If it cannot, every rank stops with its message."""
    failure = None
    if world.is_main:
        try:
            lock.acquire()
            check_writable_dir(lock.run_dir / CHECKPOINTS, "checkpoints directory")
        except CheckpointError as e:
            failure = e
    if any_rank(failure is not None):
        raise failure or CheckpointError(
            f"rank 0 could not take the run directory {lock.run_dir}; see its error"
        )


def _train(cfg: Config, run_dir: Path, resume: bool, world: World, notes: list[str]) -> TrainResult:
    ckpt = _resume_point(run_dir, resume)
    prepare_tokenizer(cfg, run_dir, world)
    run = new_run(cfg, world, run_dir)
    if ckpt is None and cfg.train.init_from:
        notes.append(init_weights(run, cfg.train.init_from))
    if ckpt is not None:
        changed = check_resumable(load_config(ckpt), cfg)
        state = load_train_state(ckpt)
        load_weights(run.model, ckpt)
        load_optimizer(run.model, run.optimizer, ckpt, state)
        try:
            run.load_state_dict(state)
        except KeyError as e:
            raise CheckpointError(
                f"{ckpt / STATE_FILE}: key {e.args[0]!r} is missing; it cannot be resumed"
            ) from None
        except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise CheckpointError(
                f"{ckpt / STATE_FILE}: malformed training state ({e}); it cannot be resumed"
            ) from None
        if run.ema is not None and has_ema(ckpt):
            load_ema(run.ema, run.model, ckpt)
        elif run.ema is not None:
            run.ema.restart()
            notes.append(
                f"{ckpt} has no moving average (train.ema was 0): it starts from the resumed weights"
            )
        notes.append(
            f"resuming from {ckpt} (step {checkpoint_step(ckpt)})"
            + (f"; changed since: {', '.join(changed)}" if changed else "")
        )
    logger: TrainLogger | Silent = Silent()  # rank 0 logs for every rank
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg.to_dict())
        logger = TrainLogger(run_dir, cfg.train.steps, run.step, tracking=cfg.train, config=cfg.to_dict())
    with logger as log, StopSignal() as stop:
        for line in [_describe(run, cfg, run_dir), *notes]:
            log.info(line)
        history, ckpt = _loop(run, cfg, run_dir, log, ckpt, stop)
        stopped_by = stop.name if run.step < cfg.train.steps else None
        if stopped_by:
            log.info(
                f"{stopped_by}: stopped after step {run.step}/{cfg.train.steps}, checkpoint {ckpt}; "
                f"continue with: motfusion train --out {run_dir} --resume"
            )
        else:
            log.info(f"done: step {run.step}, {run.elapsed_s:.1f} s of training, checkpoint {ckpt}")
    return TrainResult(
        run_dir=run_dir,
        step=run.step,
        checkpoint=ckpt,
        elapsed_s=run.elapsed_s,
        metrics=history,
        stopped_by=stopped_by,
    )


def _describe(run: Run, cfg: Config, run_dir: Path) -> str:
    m, t, W = run.model, cfg.train, run.world.world_size
    ranks = f" x {W} processes, parallel {run.mode}" if W > 1 else ""
    extras = [
        name
        for name, on in (("activation checkpointing", t.activation_checkpointing), ("compile", t.compile))
        if on
    ]
    return (
        f"recipe {cfg.recipe}: {m.num_params() / 1e6:.2f}M params ({m.num_params(non_embedding=True) / 1e6:.2f}M "
        f"non-embedding), untie={','.join(cfg.model.untie) or 'none'} | device {run.device}{ranks} | "
        f"{resolve_precision(t.precision, run.device)}{''.join(', ' + e for e in extras)} | "
        f"{t.batch_size}x{t.seq_len} tokens/step"
        + (f" ({t.batch_size // W} rows per rank)" if W > 1 else "")
        + f" | {t.steps} steps -> {run_dir}"
    )
