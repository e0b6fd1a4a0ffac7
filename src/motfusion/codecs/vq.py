"""A VQ-VAE image tokenizer: the discrete image codes of the Chameleon setting.

The encoder maps a (C, H, W) image to an (H/d, W/d) grid of vectors (d = `downsample`, 4 by
default: a 32px image becomes 8 x 8 = 64 codes); each vector is replaced by its nearest codebook
entry, and the decoder maps the grid of entries back to pixels. Gradients pass the quantizer
straight through (van den Oord et al., 2017).

The codebook is not trained by gradients but as running averages (the paper's appendix; VQ-VAE-2):
each entry tracks the exponential moving average of the encoder outputs assigned to it. A
commitment loss keeps the encoder near its codes. Entries that stop being chosen are restarted on
random encoder outputs of the current batch, so the whole codebook stays in use.

`motfusion train-vq` (training/vq.py) writes an artifact directory (artifacts.py, kind "vq":
weights.safetensors with the codebook, config.json with the VQConfig) and metrics.json beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from motfusion.artifacts import load_artifact, save_artifact
from motfusion.config import ModelConfig, TrackingConfig, dataclass_from_dict
from motfusion.errors import ConfigError

METRICS = "metrics.json"


@dataclass(kw_only=True)
class VQConfig(TrackingConfig):
    """The VQ-VAE's architecture and its training run (and where it logs: TrackingConfig)."""

    # architecture
    codebook_size: int = 512
    code_dim: int = 32
    channels: int = 64
    downsample: int = 4  # a power of 2: one stride-2 convolution per factor of 2
    res_blocks: int = 2
    image_channels: int = 3
    image_size: int = 32
    beta: float = 0.25  # commitment loss weight
    decay: float = 0.99  # of the codebook's moving averages
    dead_below: float = 0.5  # an entry whose average batch count falls below this is restarted
    # training
    dataset: str = "shapes"  # any data.dataset name; only its images are used
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3  # cosine decay to lr / 10
    seed: int = 0
    log_every: int = 100
    val_images: int = 256

    def validate(self) -> VQConfig:
        d = self.downsample
        if d < 2 or d & (d - 1):
            raise ConfigError(f"downsample={d} must be a power of 2, at least 2")
        if self.image_size % d:
            raise ConfigError(f"image size {self.image_size} must be divisible by downsample={d}")
        if min(self.codebook_size, self.code_dim, self.channels) <= 0 or self.res_blocks < 0:
            raise ConfigError("codebook_size, code_dim and channels must be positive, res_blocks >= 0")
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"decay={self.decay} must be in (0, 1)")
        if min(self.steps, self.batch_size, self.log_every, self.val_images) <= 0 or self.lr <= 0:
            raise ConfigError("steps, batch_size, log_every, val_images and lr must be positive")
        self.check_tracking()
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def codes_per_image(self) -> int:
        return self.grid**2


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def encoder(cfg: VQConfig) -> nn.Sequential:
    """VQ-VAE's encoder: 4x4 stride-2 convolutions (each halves H and W), residual blocks, 1x1 to codes."""
    C, levels = cfg.channels, int(math.log2(cfg.downsample))
    layers: list[nn.Module] = []
    for i in range(levels):
        layers += [nn.Conv2d(cfg.image_channels if i == 0 else C, C, 4, stride=2, padding=1), nn.ReLU()]
    layers += [ResBlock(C) for _ in range(cfg.res_blocks)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(C, cfg.code_dim, 1))


def decoder(cfg: VQConfig) -> nn.Sequential:
    """The mirror image: residual blocks, then 4x4 stride-2 transposed convolutions back to pixels."""
    C, levels = cfg.channels, int(math.log2(cfg.downsample))
    layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, C, 3, padding=1)]
    layers += [ResBlock(C) for _ in range(cfg.res_blocks)]
    for i in range(levels):
        out = cfg.image_channels if i == levels - 1 else C
        layers += [nn.ReLU(), nn.ConvTranspose2d(C, out, 4, stride=2, padding=1)]  # doubles H and W
    return nn.Sequential(*layers)


class Codebook(nn.Module):
    """K entries of dimension d, updated as moving averages of the vectors assigned to them."""

    def __init__(self, size: int, dim: int, decay: float, dead_below: float):
        super().__init__()
        self.decay, self.dead_below = decay, dead_below
        self.register_buffer("embed", torch.zeros(size, dim))
        self.register_buffer("count", torch.zeros(size))  # moving average of each entry's batch count
        self.register_buffer("total", torch.zeros(size, dim))  # moving average of their sum
        self.register_buffer("ready", torch.tensor(False))  # initialized from a first batch

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """z: (n, d) -> (n,) index of the nearest entry (squared L2)."""
        dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.embed.T + self.embed.pow(2).sum(1)  # (n, K)
        return dist.argmin(dim=1)

    @torch.no_grad()
    def update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        """One moving-average step from a batch of encoder outputs z (n, d) and their codes (n,)."""
        K = self.embed.shape[0]
        counts = torch.bincount(codes, minlength=K).to(z.dtype)  # (K,)
        sums = torch.zeros_like(self.total).index_add_(0, codes, z)  # (K, d)
        self.count.lerp_(counts, 1 - self.decay)
        self.total.lerp_(sums, 1 - self.decay)
        n = self.count.sum()
        smoothed = (self.count + 1e-5) / (n + K * 1e-5) * n  # Laplace smoothing: no division by zero
        self.embed.copy_(self.total / smoothed[:, None])
        self.restart(z, self.count < self.dead_below)

    @torch.no_grad()
    def restart(self, z: torch.Tensor, which: torch.Tensor) -> None:
        """Move the entries in `which` (K,) bool onto random rows of z, with a count of 1."""
        n_dead = int(which.sum())
        if n_dead:
            pick = z[torch.randint(z.shape[0], (n_dead,), device=z.device)]
            self.embed[which], self.total[which], self.count[which] = pick, pick, 1.0

    @torch.no_grad()
    def initialize(self, z: torch.Tensor) -> None:
        self.restart(z, torch.ones_like(self.count, dtype=torch.bool))
        self.ready.fill_(True)


@dataclass
class VQOutput:
    recon: torch.Tensor  # (N, C, H, W)
    codes: torch.Tensor  # (N, L) codebook indices, raster order
    commit: torch.Tensor  # () commitment loss


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.encoder, self.decoder = encoder(cfg), decoder(cfg)
        self.codebook = Codebook(cfg.codebook_size, cfg.code_dim, cfg.decay, cfg.dead_below)

    @property
    def vocab_size(self) -> int:
        return self.cfg.codebook_size

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: (N, d, h, w) -> straight-through quantized z (N, d, h, w), codes (N, h*w), commitment loss."""
        N, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (N*h*w, d), raster order per image
        if self.training and not self.codebook.ready:
            self.codebook.initialize(flat.detach())
        codes = self.codebook.assign(flat.detach())
        if self.training:
            self.codebook.update(flat.detach(), codes)
        zq = self.codebook.embed[codes]  # (N*h*w, d)
        commit = F.mse_loss(flat, zq)
        zq = flat + (zq - flat).detach()  # straight through
        return zq.view(N, h, w, d).permute(0, 3, 1, 2), codes.view(N, h * w), commit

    def forward(self, x: torch.Tensor) -> VQOutput:
        """x: (N, C, H, W) in [-1, 1]."""
        zq, codes, commit = self.quantize(self.encoder(x))
        return VQOutput(recon=self.decoder(zq), codes=codes, commit=commit)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, VQOutput]:
        out = self(x)
        return F.mse_loss(out.recon, x) + self.cfg.beta * out.commit, out

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> codes (N, L), L = (H/d) * (W/d), in raster order."""
        z = self.encoder(x)  # (N, d, h, w)
        N, d, h, w = z.shape
        return self.codebook.assign(z.permute(0, 2, 3, 1).reshape(-1, d)).view(N, h * w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (N, L) of square grids -> images (N, C, H, W) in [-1, 1]."""
        N, L = codes.shape
        g = math.isqrt(L)
        if g * g != L:
            raise ValueError(f"{L} codes per image do not form a square grid")
        zq = self.codebook.embed[codes].view(N, g, g, -1).permute(0, 3, 1, 2)  # (N, d, g, g)
        return self.decoder(zq).clamp(-1, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2): (N, C, H, W) -> (N,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def perplexity(codes: torch.Tensor, codebook_size: int) -> float:
    """exp(entropy) of the code frequencies: K if all K codes are used equally, 1 if one code is."""
    p = torch.bincount(codes.flatten(), minlength=codebook_size).double()
    p = p / p.sum()
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


def load_image_tokenizer(
    model_cfg: ModelConfig, image_size: int, device: torch.device | str = "cpu"
) -> VQVAE:
    """The VQ-VAE in `model.vq`, checked against the model's image vocabulary and the image size."""
    vq = load_vq(model_cfg.vq, device)
    vocab = model_cfg.vocab_sizes.get("image")
    if vocab != vq.vocab_size:
        raise ConfigError(
            f"model.vocab_sizes has image:{vocab} but the VQ-VAE in {model_cfg.vq} has "
            f"{vq.vocab_size} codes: set model.vocab_sizes=image:{vq.vocab_size}"
        )
    if image_size % vq.cfg.downsample:
        raise ConfigError(
            f"data.image_size={image_size} must be divisible by the VQ-VAE's downsampling "
            f"factor {vq.cfg.downsample} ({model_cfg.vq})"
        )
    return vq


def save_vq(model: VQVAE, out: Path, metrics: dict | None = None) -> None:
    """The artifact, and `metrics` (val PSNR, codebook usage) in metrics.json beside it."""
    out = save_artifact(out, "vq", model.state_dict(), dataclasses.asdict(model.cfg))
    if metrics is not None:
        (out / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")


def load_vq(path: Path | str, device: torch.device | str = "cpu") -> VQVAE:
    """A `motfusion train-vq` directory (or an older vq.safetensors + vq_config.json) -> its VQ-VAE, in eval mode."""
    artifact = load_artifact(path, "vq", f"train one with `motfusion train-vq --dataset shapes --out {path}`")
    model = VQVAE(dataclass_from_dict(VQConfig, artifact.config))
    model.load_state_dict(artifact.tensors)
    return model.to(device).eval()
