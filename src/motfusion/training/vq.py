"""Training a VQ-VAE on a dataset's images, and scoring it (`motfusion train-vq`).

The output directory is the VQ artifact (codecs/vq.py: weights, VQConfig) plus `metrics.json`
(reconstruction PSNR and codebook usage on held-out images) and `metrics.jsonl` (the training
records; also sent to TensorBoard and W&B when the config's tracking keys ask).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sized
from dataclasses import asdict
from pathlib import Path

import torch

from motfusion.codecs.vq import VQVAE, VQConfig, perplexity, psnr, save_vq
from motfusion.data.pipeline import image_dataset
from motfusion.training.logging import Tracker
from motfusion.training.loop import LoopConfig, train_loop


class ImageSource:
    """Batches of a dataset's images, a pure function of the batch's first index."""

    def __init__(self, dataset: str, image_size: int, split: str):
        self.data = image_dataset(dataset, image_size, split)
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
    return {
        "psnr": float(torch.cat(scores).mean()),
        "perplexity": perplexity(codes, K),
        "codes_used": int(codes.unique().numel()),
        "codebook_size": K,
        "codes_per_image": codes.shape[1],
    }


def train_vq(cfg: VQConfig, out: Path, log: Callable[[str], None] = print) -> tuple[VQVAE, dict[str, float]]:
    """Train on `cfg.dataset`'s train images (cosine decay to lr / 10), score on its val images, save into `out`."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    train, val = (
        ImageSource(cfg.dataset, cfg.image_size, "train"),
        ImageSource(cfg.dataset, cfg.image_size, "val"),
    )
    model = VQVAE(cfg).train()

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, object]]:
        x = train.batch((step - 1) * cfg.batch_size, cfg.batch_size)  # (B, C, H, W)
        loss, vq_out = model.loss(x)
        batch_psnr = psnr(vq_out.recon.detach(), x).mean()
        return loss, {"psnr": batch_psnr, "perplexity": perplexity(vq_out.codes, cfg.codebook_size)}

    loop = LoopConfig(
        name="vq", steps=cfg.steps, lr=cfg.lr, min_lr=cfg.lr / 10, betas=(0.9, 0.99), log_every=cfg.log_every
    )
    start = time.perf_counter()
    with Tracker(out, tracking=cfg, config=asdict(cfg)) as tracker:
        train_loop(model.parameters(), step_loss, loop, log, tracker.log)
    metrics = evaluate_vq(model, val.batch(0, cfg.val_images))
    metrics.update(steps=cfg.steps, train_seconds=time.perf_counter() - start, dataset=cfg.dataset)
    save_vq(model, out, metrics)
    log(
        f"val: psnr {metrics['psnr']:.2f} dB | perplexity {metrics['perplexity']:.1f} | "
        f"{metrics['codes_used']}/{cfg.codebook_size} codes used -> {out}"
    )
    return model, metrics
