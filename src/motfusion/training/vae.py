"""`motfusion train-vae`: train the small KL-VAE on a registered image dataset, measure it, save it.

    loss = recon + kl_weight * KL / (C * H * W)

recon is the mean L1 (or L2) error per pixel value, KL the posterior's divergence from N(0, I) in
nats per image; dividing it by the image's number of values weighs the two as LDM's sums do, so
kl_weight values compare with theirs (1e-6 .. 1e-4). The decoder reconstructs from a posterior
sample during training and from the posterior mean when measured.

DIR receives the artifact (artifacts.py: weights.safetensors, config.json with the VAEConfig and its
latent scale factor) and metrics.jsonl (one record per logged step, then a final one with val_psnr
and scale_factor), also sent to TensorBoard and W&B when the config's tracking keys ask.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from motfusion.artifacts import KINDS, WEIGHTS, kind_of
from motfusion.codecs.diffusers_vae import AutoencoderKL
from motfusion.codecs.vae import VAEConfig, build_vae, save_vae
from motfusion.data.pipeline import EpochOrder, image_dataset
from motfusion.errors import ConfigError
from motfusion.training.logging import Tracker
from motfusion.training.loop import LoopConfig, optimizer_step, train_loop


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


def vae_loss(
    model: AutoencoderKL, x: torch.Tensor, cfg: VAEConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x (B, C, H, W) -> (loss, {"recon": per pixel value, "kl": nats per image})."""
    recon, posterior = model(x, generator)
    err = recon - x
    rec = err.abs().mean() if cfg.loss == "l1" else err.square().mean()
    kl = posterior.kl().mean()
    return rec + cfg.kl_weight * kl / x[0].numel(), {"recon": rec, "kl": kl}


# ---- images ------------------------------------------------------------------------------------


def image_batch(dataset, indices: list[int], image_size: int) -> torch.Tensor:
    """The images of `indices` -> (B, 3, S, S) in [-1, 1]."""
    images = torch.stack([dataset.sample(i).image for i in indices])
    if images.shape[1:] != (3, image_size, image_size):
        raise ConfigError(
            f"the dataset gave images of shape {tuple(images.shape[1:])}, not (3, {image_size}, {image_size})"
        )
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
        x = image_batch(dataset, indices[i : i + cfg.batch_size], cfg.image_size).to(device)
        scores.append(psnr(model.decode(model.encode(x).mean).clamp(-1, 1), x))
    return torch.cat(scores).mean().item()


@torch.no_grad()
def latent_scale(model: AutoencoderKL, dataset, cfg: VAEConfig, device: torch.device) -> float:
    """1 / std of the posterior means of the first `cfg.scale_images` images: scaled latents have unit std."""
    model.eval()
    indices = first_indices(dataset, cfg.scale_images)
    latents = [
        model.encode(image_batch(dataset, indices[i : i + cfg.batch_size], cfg.image_size).to(device)).mean
        for i in range(0, len(indices), cfg.batch_size)
    ]
    return 1.0 / torch.cat(latents).std().item()


# ---- training ----------------------------------------------------------------------------------


def loop_config(cfg: VAEConfig) -> LoopConfig:
    """Warmup, then cosine decay to a tenth of the peak at the last step."""
    return LoopConfig(
        name="vae",
        steps=cfg.steps,
        lr=cfg.lr,
        warmup=cfg.warmup,
        min_lr=cfg.lr / 10,
        betas=(0.9, 0.99),
        grad_clip=cfg.grad_clip,
        log_every=cfg.log_every,
    )


def train_vae(cfg: VAEConfig, out: Path, device: torch.device | str | None = None) -> VAEResult:
    """Train, set the latent scale factor, measure val PSNR, and save the artifact in `out`."""
    cfg.validate()
    out = Path(out)
    if (found := kind_of(out)) is not None:
        raise ConfigError(f"{out} already holds {KINDS.get(found, found)}; choose another --out or delete it")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_set = image_dataset(cfg.dataset, cfg.image_size, "train", cfg.seed)
    val_set = image_dataset(cfg.dataset, cfg.image_size, "val", cfg.seed)
    order = EpochOrder(train_set, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_vae(cfg).to(device).train()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        indices = [order((step - 1) * cfg.batch_size + j) for j in range(cfg.batch_size)]
        return vae_loss(model, image_batch(train_set, indices, cfg.image_size).to(device), cfg, generator)

    out.mkdir(parents=True, exist_ok=True)
    print(
        f"VAE {model.num_params() / 1e6:.2f}M params, widths {list(cfg.widths)}, {cfg.latent_channels} latent "
        f"channels, {cfg.downsample}x downsampling | {cfg.dataset} {cfg.image_size}px | {cfg.steps} steps -> {out}"
    )
    history: list[dict[str, Any]] = []
    with Tracker(out, tracking=cfg, config=asdict(cfg)) as tracker:

        def on_log(record: dict[str, float]) -> None:
            history.append({**record, "images_per_s": 1000 * cfg.batch_size / record["dt_ms"]})
            tracker.log(history[-1])

        elapsed = train_loop(model.parameters(), step_loss, loop_config(cfg), on_log=on_log)[-1]["elapsed_s"]
        cfg.scale_factor = latent_scale(model, train_set, cfg, device)
        val_psnr = evaluate_psnr(model, val_set, cfg, device)
        final = {
            "step": cfg.steps,
            "val_psnr": val_psnr,
            "val_images": len(first_indices(val_set, cfg.val_images)),
            "scale_factor": cfg.scale_factor,
            "elapsed_s": elapsed,
        }
        tracker.log(final)
    save_vae(out, model, cfg)
    print(
        f"val PSNR {val_psnr:.2f} dB on {final['val_images']} {cfg.dataset} val images | scale_factor "
        f"{cfg.scale_factor:.4f} | {elapsed:.0f} s of training | wrote {out / WEIGHTS}"
    )
    return VAEResult(out, val_psnr, cfg.scale_factor, elapsed, history)


def train_step(
    model: AutoencoderKL,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    cfg: VAEConfig,
    generator: torch.Generator,
    lr: float,
) -> dict[str, float]:
    """One update on the images x (B, C, H, W): {loss, recon, kl, grad_norm}."""
    model.train()
    loss, parts = vae_loss(model, x, cfg, generator)
    return optimizer_step(optimizer, loss, parts, lr, cfg.grad_clip, "vae")
