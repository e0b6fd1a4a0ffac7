"""`motfusion train-vae`: train the small KL-VAE on a registered image dataset, measure it, save it.

    loss = recon + kl_weight * KL / (C * H * W)

recon is the mean L1 (or L2) error per pixel value, KL the posterior's divergence from N(0, I) in
nats per image; dividing it by the image's number of values weighs the two as LDM's sums do, so
kl_weight values compare with theirs (1e-6 .. 1e-4). The decoder reconstructs from a posterior
sample during training and from the posterior mean when measured.

DIR receives config.json (the VAEConfig, with the latent scale factor), model.safetensors and
metrics.jsonl (one record per logged step, then a final one with val_psnr and scale_factor).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from motfusion.codecs.diffusers_vae import AutoencoderKL
from motfusion.codecs.vae import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    VAEConfig,
    build_vae,
    save_vae,
)
from motfusion.config import Config, DataConfig, TrainConfig
from motfusion.data.pipeline import EpochOrder, build_dataset
from motfusion.errors import ConfigError, NonFiniteLossError

METRICS_FILE = "metrics.jsonl"


@dataclass
class VAEResult:
    out: Path
    val_psnr: float  # dB, mean over the val images
    scale_factor: float
    elapsed_s: float
    metrics: list[dict[str, Any]] = field(default_factory=list)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image pair: x, y (B, C, H, W) in [-1, 1] -> (B,).

    Measured on the [0, 1] scale, the usual convention: 10 * log10(1 / MSE).
    """
    mse = ((x.float() - y.float()) / 2).square().flatten(1).mean(dim=1)  # (B,)
    return 10 * torch.log10(1 / mse)


def vae_loss(model: AutoencoderKL, x: torch.Tensor, cfg: VAEConfig,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x (B, C, H, W) -> (loss, {"recon": per pixel value, "kl": nats per image})."""
    recon, posterior = model(x, generator)
    err = recon - x
    rec = err.abs().mean() if cfg.loss == "l1" else err.square().mean()
    kl = posterior.kl().mean()
    return rec + cfg.kl_weight * kl / x[0].numel(), {"recon": rec, "kl": kl}


# ---- images ------------------------------------------------------------------------------------

def image_dataset(cfg: VAEConfig, split: str):
    """The registered dataset `cfg.dataset` at `cfg.image_size`; it must give (image, caption) samples."""
    run = Config(data=DataConfig(dataset=cfg.dataset, image_size=cfg.image_size), train=TrainConfig(seed=cfg.seed))
    dataset = build_dataset(run, split)
    if not hasattr(dataset, "sample"):
        raise ConfigError(f"dataset={cfg.dataset!r} gives documents, not images; train the VAE on an image dataset")
    return dataset


def image_batch(dataset, indices: list[int], image_size: int) -> torch.Tensor:
    """The images of `indices` -> (B, 3, S, S) in [-1, 1]."""
    images = torch.stack([dataset.sample(i).image for i in indices])
    if images.shape[1:] != (3, image_size, image_size):
        raise ConfigError(f"the dataset gave images of shape {tuple(images.shape[1:])}, not (3, {image_size}, {image_size})")
    return images


def first_indices(dataset, n: int) -> list[int]:
    """0 .. n-1, or the whole dataset when it holds fewer."""
    return list(range(min(n, len(dataset)) if isinstance(dataset, Sized) else n))


@torch.no_grad()
def evaluate_psnr(model: AutoencoderKL, dataset, cfg: VAEConfig, device: torch.device) -> float:
    """Mean PSNR of posterior-mean reconstructions over the first `cfg.val_images` images."""
    model.eval()
    indices, scores = first_indices(dataset, cfg.val_images), []
    for i in range(0, len(indices), cfg.batch_size):
        x = image_batch(dataset, indices[i:i + cfg.batch_size], cfg.image_size).to(device)
        scores.append(psnr(model.decode(model.encode(x).mean).clamp(-1, 1), x))
    return torch.cat(scores).mean().item()


@torch.no_grad()
def latent_scale(model: AutoencoderKL, dataset, cfg: VAEConfig, device: torch.device) -> float:
    """1 / std of the posterior means of the first `cfg.scale_images` images: scaled latents have unit std."""
    model.eval()
    indices = first_indices(dataset, cfg.scale_images)
    latents = [model.encode(image_batch(dataset, indices[i:i + cfg.batch_size], cfg.image_size).to(device)).mean
               for i in range(0, len(indices), cfg.batch_size)]
    return 1.0 / torch.cat(latents).std().item()


# ---- training ----------------------------------------------------------------------------------

def lr_at(step: int, cfg: VAEConfig) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak at the last step (1-based steps)."""
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_vae(cfg: VAEConfig, out: Path, device: torch.device | str | None = None) -> VAEResult:
    """Train, set the latent scale factor, measure val PSNR, and save DIR/{config.json, model.safetensors}."""
    cfg.validate()
    out = Path(out)
    if (out / WEIGHTS_FILE).exists():
        raise ConfigError(f"{out} already holds a trained VAE ({WEIGHTS_FILE}); choose another --out or delete it")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_set, val_set = image_dataset(cfg, "train"), image_dataset(cfg, "val")
    order = EpochOrder(train_set, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_vae(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    metrics_file = (out / METRICS_FILE).open("w")
    print(f"VAE {model.num_params() / 1e6:.2f}M params, widths {list(cfg.widths)}, {cfg.latent_channels} latent "
          f"channels, {cfg.downsample}x downsampling | {cfg.dataset} {cfg.image_size}px | {cfg.steps} steps -> {out}")
    history, start = [], time.perf_counter()
    with metrics_file:
        for step in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            x = image_batch(train_set, [order((step - 1) * cfg.batch_size + j) for j in range(cfg.batch_size)],
                            cfg.image_size).to(device)
            stats = train_step(model, optimizer, x, cfg, generator, lr_at(step, cfg))
            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = time.perf_counter() - t0
                history.append({"step": step, **stats, "lr": lr_at(step, cfg), "dt_ms": 1000 * dt,
                                "images_per_s": cfg.batch_size / dt, "elapsed_s": time.perf_counter() - start})
                _log(metrics_file, history[-1], cfg.steps)
        elapsed = time.perf_counter() - start
        cfg.scale_factor = latent_scale(model, train_set, cfg, device)
        val_psnr = evaluate_psnr(model, val_set, cfg, device)
        final = {"step": cfg.steps, "val_psnr": val_psnr, "val_images": len(first_indices(val_set, cfg.val_images)),
                 "scale_factor": cfg.scale_factor, "elapsed_s": elapsed}
        metrics_file.write(json.dumps(final) + "\n")
    save_vae(out, model, cfg)
    print(f"val PSNR {val_psnr:.2f} dB on {final['val_images']} {cfg.dataset} val images | scale_factor "
          f"{cfg.scale_factor:.4f} | {elapsed:.0f} s of training | wrote {out / CONFIG_FILE}, {out / WEIGHTS_FILE}")
    return VAEResult(out, val_psnr, cfg.scale_factor, elapsed, history)


def train_step(model: AutoencoderKL, optimizer: torch.optim.Optimizer, x: torch.Tensor, cfg: VAEConfig,
                generator: torch.Generator, lr: float) -> dict[str, float]:
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss, parts = vae_loss(model, x, cfg, generator)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    values = torch.stack([loss.detach(), parts["recon"].detach(), parts["kl"].detach(), grad_norm]).tolist()
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteLossError(f"non-finite VAE loss {values[0]:.4g} at lr {lr:.2e}; lower lr or raise warmup")
    optimizer.step()
    return dict(zip(("loss", "recon", "kl", "grad_norm"), values))


def _log(file, record: dict[str, Any], total_steps: int) -> None:
    file.write(json.dumps(record) + "\n")
    file.flush()
    print(f"step {record['step']}/{total_steps} | loss {record['loss']:.4f} | recon {record['recon']:.4f} | "
          f"kl {record['kl']:.1f} | lr {record['lr']:.1e} | norm {record['grad_norm']:.2f} | "
          f"{record['images_per_s']:.0f} img/s | {record['dt_ms']:.0f} ms", flush=True)


# ---- command line ------------------------------------------------------------------------------
