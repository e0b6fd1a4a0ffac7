"""Modality adapters: the light per-modality layers around the shared backbone.

Discrete modalities (text, and any with a vocabulary in `model.vocab_sizes`: VQ image codes, speech
units): a token embedding in, logits out, each with its own tables. Continuous images: a patcher that
turns a noisy image and its timestep into patch vectors, and turns the backbone's hidden states back
into a prediction of the same shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class TokenAdapter(nn.Module):
    """One discrete modality's embedding table and output head, over its own (local) vocabulary."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (N,) float timesteps -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs  # (N, half)
    return torch.cat((args.cos(), args.sin()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim))  # (N, D)


def patchify(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/k * W/k, C*k*k), patches in raster order (left to right, top to bottom)."""
    N, C, H, W = x.shape
    x = x.view(N, C, H // k, k, W // k, k).permute(0, 2, 4, 1, 3, 5)  # (N, H/k, W/k, C, k, k)
    return x.reshape(N, (H // k) * (W // k), C * k * k)


def unpatchify(p: torch.Tensor, k: int, C: int, H: int, W: int) -> torch.Tensor:
    """Inverse of patchify: (N, L, C*k*k) -> (N, C, H, W)."""
    N = p.shape[0]
    x = p.view(N, H // k, W // k, C, k, k).permute(0, 3, 1, 4, 2, 5)  # (N, C, H/k, k, W/k, k)
    return x.reshape(N, C, H, W)


class LinearPatcher(nn.Module):
    """Transfusion's linear patcher: a k x k patch -> one vector, plus a timestep embedding per patch."""

    def __init__(self, channels: int, patch_size: int, dim: int):
        super().__init__()
        self.k, self.channels = patch_size, channels
        self.proj_in = nn.Linear(channels * patch_size**2, dim)
        self.time = TimestepEmbedding(dim)
        self.proj_out = nn.Linear(dim, channels * patch_size**2)

    def tokens_per_image(self, height: int, width: int) -> int:
        return (height // self.k) * (width // self.k)

    def embed(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, None]:
        """x_t: (N, C, H, W) noisy images, t: (N,) -> (N, L, D), and no skips (the U-Net has some)."""
        return self.proj_in(patchify(x_t, self.k)) + self.time(t)[:, None, :], None

    def predict(self, h: torch.Tensor, height: int, width: int, skips: None = None) -> torch.Tensor:
        """h: (N, L, D) hidden states at the image's patches -> (N, C, H, W)."""
        return unpatchify(self.proj_out(h), self.k, self.channels, height, width)
