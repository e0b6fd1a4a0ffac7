"""Speech units back to log-mel frames with a small convolutional network: a better decoder than the
units' centroids, in front of the same Griffin-Lim (codecs/vocoder.py).

A centroid is the mean of every frame that falls in its cluster, so decoding unit by unit blurs
each sound and steps from one to the next every 40 ms. The decoder looks at several units on each
side (a stack of residual 1-D convolutions), learns from the real log-mels of the training audio
what frames a sequence of units came from, and writes `upsample` frames per unit (100 frames per
second by default), which Griffin-Lim then inverts without interpolating.

Its output is the centroid path plus a learned correction: the embedding of each unit starts as
its centroid, the frames start as the linear interpolation between neighbouring units' embeddings
(exactly the interpolation MelVocoder applies to centroid frames) and the correction's last layer
starts at zero. An untrained decoder therefore decodes exactly like the centroids, and training can
only move it towards the real frames.

Everything is in the tokenizer's standardized log-mel space (codecs/speech.py). The decoder is
saved as an artifact (artifacts.py, kind "unit-vocoder") in the tokenizer's directory, under
`decoder/`, where SpeechTokenizer.load finds it; it records a fingerprint of the centroids it was
trained for, so a decoder left beside refitted centroids is refused rather than used. Trained by
training/unit_vocoder.py (`motfusion train-unit-vocoder`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from motfusion.artifacts import load_artifact, save_artifact
from motfusion.config import TrackingConfig, dataclass_from_dict
from motfusion.errors import ConfigError

KIND = "unit-vocoder"


@dataclass(kw_only=True)
class UnitDecoderConfig(TrackingConfig):
    """The decoder's architecture and its training run (and where it logs: TrackingConfig)."""

    k: int = 500  # the codec's vocabulary: set from the codec when training
    n_mels: int = 80  # the codec's mel bins: set from the codec when training
    upsample: int = 4  # frames per unit: hop 640 / 4 = 160 samples, 100 frames per second
    channels: int = 192
    kernel: int = 5  # units each convolution sees; 2 per block, so 4 blocks see 17 units (0.7 s)
    blocks: int = 4
    # training
    steps: int = 1500
    batch_size: int = 16
    crop: int = 64  # units per training example (2.6 s)
    lr: float = 2e-3  # warmup, then cosine decay to lr / 20
    warmup: int = 50
    seed: int = 0
    log_every: int = 100

    def validate(self) -> UnitDecoderConfig:
        positive = ("k", "n_mels", "upsample", "channels", "kernel", "blocks", "steps", "batch_size", "crop")
        if min(getattr(self, k) for k in positive) <= 0 or self.lr <= 0 or self.log_every <= 0:
            raise ConfigError(f"unit decoder keys {', '.join(positive)}, lr and log_every must be positive")
        if self.kernel % 2 == 0 or self.warmup < 0:
            raise ConfigError(f"kernel={self.kernel} must be odd and warmup={self.warmup} >= 0")
        self.check_tracking()
        return self


def interpolate_units(frames: torch.Tensor, r: int) -> torch.Tensor:
    """(B, D, T) one frame per unit -> (B, D, r * T): frame t * r + j = (1 - j / r) x_t + (j / r) x_{t+1}
    (the last unit held). Its first r * (T - 1) + 1 frames are F.interpolate(..., align_corners=True)'s."""
    nxt = torch.cat([frames[..., 1:], frames[..., -1:]], dim=-1)  # (B, D, T)
    w = torch.arange(r, device=frames.device, dtype=frames.dtype) / r  # (r,)
    return (frames[..., None] * (1 - w) + nxt[..., None] * w).flatten(-2)  # (B, D, T * r)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(channels, channels, kernel, padding=kernel // 2)
        self.norm = nn.LayerNorm(channels)  # per frame, so a crop and a whole utterance agree

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, C, T)
        x = self.norm(h.transpose(1, 2)).transpose(1, 2)
        return h + self.conv2(F.gelu(self.conv1(F.gelu(x))))


class UnitDecoder(nn.Module):
    """(B, T) unit ids -> (B, n_mels, upsample * T) standardized log-mel frames."""

    def __init__(self, cfg: UnitDecoderConfig, centroids: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.k, cfg.n_mels)
        if centroids is not None:  # (k, n_mels): start from the centroid decoder
            self.embed.weight.data.copy_(centroids)
        self.inp = nn.Conv1d(cfg.n_mels, cfg.channels, cfg.kernel, padding=cfg.kernel // 2)
        self.blocks = nn.ModuleList(ResBlock(cfg.channels, cfg.kernel) for _ in range(cfg.blocks))
        self.out = nn.Conv1d(cfg.channels, cfg.upsample * cfg.n_mels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, units: torch.Tensor) -> torch.Tensor:
        B, T = units.shape
        r, M = self.cfg.upsample, self.cfg.n_mels
        e = self.embed(units).transpose(1, 2)  # (B, M, T)
        h = self.inp(e)  # (B, C, T)
        for block in self.blocks:
            h = block(h)
        fix = self.out(F.gelu(h)).view(B, r, M, T)  # (B, r, M, T): frame j of unit t
        fix = fix.permute(0, 2, 3, 1).reshape(B, M, T * r)  # (B, M, T * r), frame t * r + j
        return interpolate_units(e, r) + fix


def fingerprint(centroids: torch.Tensor) -> str:
    """A short hash of the centroids a decoder was trained for."""
    return hashlib.sha256(centroids.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def save_unit_decoder(
    model: UnitDecoder, out: str | Path, centroids: torch.Tensor, info: dict | None = None
) -> Path:
    meta = {"centroids": fingerprint(centroids), **(info or {})}
    return save_artifact(out, KIND, model.state_dict(), dataclasses.asdict(model.cfg), meta)


def load_unit_decoder(path: str | Path, centroids: torch.Tensor) -> UnitDecoder:
    """The decoder in `path`, which must have been trained for these `centroids` (k, n_mels)."""
    artifact = load_artifact(
        path, KIND, "train one with `motfusion train-unit-vocoder --data DATA --codec TOKENIZER_DIR`"
    )
    if artifact.info.get("centroids") != fingerprint(centroids):
        raise ConfigError(
            f"the unit decoder in {path} was trained for other speech units (the tokenizer was refit "
            "since): train it again with `motfusion train-unit-vocoder`, or delete it"
        )
    model = UnitDecoder(dataclass_from_dict(UnitDecoderConfig, artifact.config).validate())
    model.load_state_dict(artifact.tensors)
    return model.eval()
