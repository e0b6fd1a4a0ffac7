"""motfusion's small KL-VAE, and VAE latents as the model's image representation.

The VAE is Stable Diffusion's architecture (codecs/diffusers_vae.py) at a small width: conv
encoder and decoder of residual blocks with GroupNorm and SiLU, 2x downsampling per level, an
optional mid-block self-attention, and a diagonal Gaussian posterior. `motfusion train-vae` trains
one into an artifact directory (artifacts.py): DIR/weights.safetensors and DIR/config.json (kind
"vae", the VAEConfig with the latent scale factor).

With `data.image_repr=latents model.vae=DIR` (DIR: such a directory, or a diffusers AutoencoderKL
directory) the transformer never sees pixels: dataset images are encoded once by the frozen VAE
(posterior mean, scaled to unit variance), diffusion runs on the latent grid, and generated latents
are decoded back to pixels where images leave the library (`Generator.decode_images`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from motfusion.artifacts import LEGACY, WEIGHTS, load_artifact, save_artifact
from motfusion.codecs.diffusers_vae import (
    DIFFUSERS_WEIGHTS,
    AutoencoderKL,
    AutoencoderKLConfig,
    is_diffusers_dir,
    load_diffusers_vae,
    load_state_strict,
)
from motfusion.config import TrackingConfig, apply_overrides, dataclass_from_dict
from motfusion.errors import ConfigError

LOSSES = ("l2", "l1")


@dataclass(kw_only=True)
class VAEConfig(TrackingConfig):
    """The VAE's architecture, its training run (and where it logs: TrackingConfig), and (after
    training) its latent scale factor."""

    # architecture
    channels: int = 16  # width of the full-resolution level
    channel_mult: tuple[int, ...] = ()  # width multiplier per level; empty: 1, then 2 for every lower level
    downsample: int = 4  # pixels per latent along a side: 2 ** (levels - 1)
    latent_channels: int = 4
    layers_per_block: int = 1
    attention: bool = False  # self-attention in the mid block (Stable Diffusion's VAE has it)
    norm_groups: int = 8
    # training
    dataset: str = "shapes"  # a name in motfusion.data.pipeline.DATASETS, "NAME" or "NAME:ARG"
    image_size: int = 32
    loss: str = "l2"  # reconstruction: l2 or l1, a mean over pixel values
    kl_weight: float = 1e-5  # on the KL per image divided by its number of pixel values (LDM's weighting)
    lr: float = 3e-3
    warmup: int = 50
    steps: int = 500  # the defaults train in about 3 minutes on 2 busy CPU cores
    batch_size: int = 8
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    val_images: int = 256  # held-out (val split) images the PSNR is measured on
    scale_images: int = 256  # training images whose latents set scale_factor
    # written by training: latents * scale_factor have unit standard deviation
    scale_factor: float = 1.0

    @property
    def widths(self) -> tuple[int, ...]:
        levels = self.downsample.bit_length()
        mult = self.channel_mult or (1,) + (2,) * (levels - 1)
        return tuple(self.channels * m for m in mult)

    def validate(self) -> VAEConfig:
        d = self.downsample
        _check(d >= 2 and d & (d - 1) == 0, f"downsample={d} must be a power of two >= 2, e.g. 4 or 8")
        levels = d.bit_length()
        _check(
            not self.channel_mult or len(self.channel_mult) == levels,
            f"channel_mult needs {levels} entries for downsample={d}, e.g. channel_mult={','.join(['1'] + ['2'] * (levels - 1))}",
        )
        _check(
            self.channels > 0 and all(m > 0 for m in self.channel_mult),
            "channels and channel_mult must be positive",
        )
        _check(
            self.latent_channels > 0 and self.layers_per_block > 0,
            "latent_channels and layers_per_block must be positive",
        )
        _check(
            self.norm_groups > 0 and all(w % self.norm_groups == 0 for w in self.widths),
            f"norm_groups={self.norm_groups} must divide every level's width {list(self.widths)}",
        )
        _check(self.loss in LOSSES, f"loss={self.loss!r}: choose one of {list(LOSSES)}")
        _check(self.image_size % d == 0, f"image_size={self.image_size} must be divisible by downsample={d}")
        _check(
            self.kl_weight >= 0 and self.lr > 0 and self.warmup >= 0, "kl_weight >= 0, lr > 0 and warmup >= 0"
        )
        for name in ("steps", "batch_size", "log_every", "val_images"):
            _check(getattr(self, name) > 0, f"{name} must be positive")
        _check(self.scale_images >= 2, "scale_images must be >= 2 (a standard deviation needs two values)")
        _check(self.scale_factor > 0, "scale_factor must be positive")
        self.check_tracking()
        return self

    def architecture(self) -> AutoencoderKLConfig:
        """The same network described with diffusers' AutoencoderKL keys."""
        n = len(self.widths)
        return AutoencoderKLConfig(
            block_out_channels=self.widths,
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_groups,
            sample_size=self.image_size,
            scaling_factor=self.scale_factor,
            mid_block_add_attention=self.attention,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        return dataclass_from_dict(cls, d).validate()

    def override(self, items: list[str]) -> VAEConfig:
        """Apply `key=value` strings (e.g. `latent_channels=8 kl_weight=1e-6`) in place."""
        return apply_overrides(self, items).validate()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    return AutoencoderKL(cfg.validate().architecture())


# ---- a trained VAE directory ------------------------------------------------------------------


def save_vae(out: Path, model: AutoencoderKL, cfg: VAEConfig) -> None:
    save_artifact(out, "vae", model.state_dict(), cfg.to_dict())


def load_trained_vae(path: Path) -> tuple[AutoencoderKL, VAEConfig]:
    """A `motfusion train-vae` directory (or one of the older config.json + model.safetensors) ->
    (the VAE in eval mode, its config)."""
    path = Path(path)
    artifact = load_artifact(
        path,
        "vae",
        f"train one with `motfusion train-vae --dataset NAME --out {path}`, or name "
        "a diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors)",
    )
    cfg = VAEConfig.from_dict(artifact.config)
    model = build_vae(cfg)
    load_state_strict(model, artifact.tensors, path)
    return model.eval(), cfg


class LatentCodec(nn.Module):
    """A frozen VAE between pixels and the model's image space: z = (posterior mean - shift) * scale.

    The posterior mean, not a sample, so an image always has the same latent; `scale` (and, for VAEs
    that define one, `shift`) brings the latents to zero mean and unit variance, the scale the
    diffusion noise schedule assumes.
    """

    def __init__(self, vae: AutoencoderKL, scale: float, shift: float = 0.0):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scale, self.shift = float(scale), float(shift)

    @property
    def latent_channels(self) -> int:
        return self.vae.cfg.latent_channels

    @property
    def downsample(self) -> int:
        return self.vae.cfg.downsample

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/d, W/d)."""
        return (self.vae.encode(pixels).mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, h*d, w*d) in [-1, 1]."""
        return self.vae.decode(latents / self.scale + self.shift).clamp(-1, 1)


def load_vae(path: Path | str, device: torch.device | str = "cpu") -> LatentCodec:
    """A VAE directory -> its frozen codec: a `motfusion train-vae` artifact or a diffusers
    AutoencoderKL (config.json + diffusion_pytorch_model.safetensors)."""
    path = Path(path)
    try:
        if is_diffusers_dir(path):
            vae = load_diffusers_vae(path)
            codec = LatentCodec(vae, vae.cfg.scaling_factor, vae.cfg.shift_factor or 0.0)
        else:
            vae, cfg = load_trained_vae(path)
            codec = LatentCodec(vae, cfg.scale_factor)
    except ConfigError:  # already names the directory and what to fix
        raise
    except ValueError as e:  # a config or weights file that does not describe a VAE we can build
        raise ConfigError(f"cannot load the VAE in {path}: {e}") from None
    return codec.to(device)


_CODECS: dict[tuple[str, int, str], LatentCodec] = {}


def cached_vae(path: Path | str, device: torch.device | str = "cpu") -> LatentCodec:
    """load_vae, once per (directory, weights file version, device) in this process."""
    path = Path(path).resolve()
    weights = [
        path / name for name in (WEIGHTS, LEGACY["vae"][0], DIFFUSERS_WEIGHTS) if (path / name).is_file()
    ]
    key = (str(path), weights[0].stat().st_mtime_ns if weights else 0, str(torch.device(device)))
    if key not in _CODECS:
        _CODECS[key] = load_vae(path, device)
    return _CODECS[key]


# ---- latents as the image representation ------------------------------------------------------
