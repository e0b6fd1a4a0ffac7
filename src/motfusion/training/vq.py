"""Training a VQ-VAE on a dataset's images, scoring it, and its files.

A VQ directory holds `vq.safetensors` (weights and codebook), `vq_config.json` (the VQConfig) and
`metrics.json` (reconstruction PSNR and codebook usage on held-out images).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from motfusion.codecs.vq import (
    VQVAE,
    VQConfig,
    perplexity,
    psnr,
    save_vq,
)
from motfusion.config import Config
from motfusion.data.pipeline import build_dataset
from motfusion.errors import ConfigError


@dataclass(kw_only=True)
class VQTrainConfig:
    dataset: str = "shapes"  # any data.dataset name; only its images are used
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3  # cosine decay to lr / 10
    seed: int = 0
    log_every: int = 100
    val_images: int = 256

    def validate(self) -> "VQTrainConfig":
        if min(self.steps, self.batch_size, self.log_every, self.val_images) <= 0 or self.lr <= 0:
            raise ConfigError("steps, batch size, log_every, val_images and lr must be positive")
        return self


class ImageSource:
    """Batches of a dataset's images, a pure function of the batch's first index."""

    def __init__(self, dataset: str, image_size: int, split: str):

        cfg = Config().override([f"data.dataset={dataset}", f"data.image_size={image_size}"])
        self.data = build_dataset(cfg, split)
        self.size = len(self.data) if isinstance(self.data, Sized) else None

    def batch(self, start: int, n: int) -> torch.Tensor:
        """Images start .. start + n - 1 (wrapping around a finite dataset) -> (n, C, H, W)."""
        index = range(start, start + n)
        return torch.stack([self.data.sample(i % self.size if self.size else i).image for i in index])


@torch.no_grad()
def evaluate_vq(model: VQVAE, images: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Reconstruction PSNR (dB) and codebook usage on `images` (N, C, H, W)."""
    model.eval()
    codes, scores = [], []
    for chunk in images.split(batch_size):
        c = model.encode(chunk)
        codes.append(c)
        scores.append(psnr(model.decode(c), chunk))
    codes = torch.cat(codes)
    K = model.vocab_size
    return {"psnr": float(torch.cat(scores).mean()), "perplexity": perplexity(codes, K),
            "codes_used": int(codes.unique().numel()), "codebook_size": K,
            "codes_per_image": codes.shape[1]}


def train_vq(cfg: VQConfig, tcfg: VQTrainConfig, out: Path,
             log: Callable[[str], None] = print) -> tuple[VQVAE, dict[str, float]]:
    """Train on `tcfg.dataset`'s train images, score on its val images, save into `out`."""
    cfg.validate()
    tcfg.validate()
    torch.manual_seed(tcfg.seed)
    train, val = ImageSource(tcfg.dataset, cfg.image_size, "train"), ImageSource(tcfg.dataset, cfg.image_size, "val")
    model = VQVAE(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = time.perf_counter()
    for step in range(1, tcfg.steps + 1):
        for group in opt.param_groups:
            group["lr"] = tcfg.lr * (0.55 + 0.45 * math.cos(math.pi * step / tcfg.steps))  # lr -> lr / 10
        x = train.batch((step - 1) * tcfg.batch_size, tcfg.batch_size)  # (B, C, H, W)
        loss, vq_out = model.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            log(f"step {step}/{tcfg.steps} | loss {loss.item():.4f} | psnr {psnr(vq_out.recon.detach(), x).mean():.2f} dB"
                f" | perplexity {perplexity(vq_out.codes, cfg.codebook_size):.1f} | {time.perf_counter() - start:.0f} s")
    metrics = evaluate_vq(model, val.batch(0, tcfg.val_images))
    metrics.update(steps=tcfg.steps, train_seconds=time.perf_counter() - start, dataset=tcfg.dataset)
    save_vq(model, out, metrics)
    log(f"val: psnr {metrics['psnr']:.2f} dB | perplexity {metrics['perplexity']:.1f} | "
        f"{metrics['codes_used']}/{cfg.codebook_size} codes used -> {out}")
    return model, metrics
