"""Stable Diffusion's image autoencoder (diffusers' `AutoencoderKL`), written from its description.

A diffusers-format VAE directory holds `config.json` and `diffusion_pytorch_model.safetensors`. The
modules below carry diffusers' parameter names (`encoder.down_blocks.0.resnets.1.conv2.weight`, ...),
so such a file loads with `strict=True` and no network access. The semantics that decide whether the
outputs match, not just the shapes:

- ResnetBlock2D: GroupNorm -> SiLU -> 3x3 conv -> GroupNorm -> SiLU -> 3x3 conv, added to the input
  (through a 1x1 `conv_shortcut` when the width changes). Every GroupNorm uses eps 1e-6.
- Encoder downsampling: zero-pad ONE pixel on the right and bottom only, then a 3x3 stride-2 conv
  without padding (diffusers' `Downsample2D(padding=0)`). Symmetric padding shifts the grid by half a
  pixel and gives different latents from the same weights.
- Mid-block attention: one head over the H*W positions, after a GroupNorm, with biases, scale
  1/sqrt(C), softmax in float32, and a residual connection.
- Decoder upsampling: nearest-neighbour x2, then a 3x3 conv. Up blocks hold layers_per_block + 1
  resnets; down blocks layers_per_block.
- encode: encoder -> quant_conv (1x1) -> (mean, logvar), logvar clamped to [-30, 20];
  decode: post_quant_conv (1x1) -> decoder.

The same architecture at a small width is motfusion's own KL-VAE (codecs/vae.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
NORM_EPS = 1e-6
# config.json keys that do not change the computation here (bookkeeping, dtype hints, SDXL statistics).
IGNORED_KEYS = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "force_upcast",
    "latents_mean",
    "latents_std",
}
# Names older diffusers releases wrote for the mid-block attention, and the current ones.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass(kw_only=True)
class AutoencoderKLConfig:
    """The keys of a diffusers AutoencoderKL config.json, with diffusers' defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @property
    def downsample(self) -> int:
        """Pixels per latent along a side: every block but the last halves the resolution."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> AutoencoderKLConfig:
        n = len(self.block_out_channels)
        if n == 0 or any(c <= 0 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels={list(self.block_out_channels)} must be positive widths")
        if list(self.down_block_types) != [DOWN_BLOCK] * n or list(self.up_block_types) != [UP_BLOCK] * n:
            raise ValueError(
                f"only {n} x {DOWN_BLOCK} / {UP_BLOCK} blocks are supported, got "
                f"{list(self.down_block_types)} / {list(self.up_block_types)}"
            )
        if self.act_fn != "silu":
            raise ValueError(f"act_fn={self.act_fn!r}: only 'silu' is supported")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every block width, not {bad}"
            )
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError("layers_per_block and latent_channels must be >= 1")
        return self

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AutoencoderKLConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - IGNORED_KEYS)
        if unknown:
            raise ValueError(f"unsupported AutoencoderKL config keys {unknown}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kwargs).validate()

    def to_json(self) -> dict[str, Any]:
        return {"_class_name": "AutoencoderKL", **dataclasses.asdict(self)}


# ---- building blocks --------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).float() for proj in (self.to_q, self.to_k, self.to_v))  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v).to(x.dtype)  # (B, HW, C), scale 1/sqrt(C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample2D(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2): pad right and bottom by one zero, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, n_layers: int, groups: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * n_layers
        self.resnets = nn.ModuleList(ResnetBlock2D(a, b, groups) for a, b in zip(widths, widths[1:]))
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, n_layers: int, groups: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * n_layers
        self.resnets = nn.ModuleList(ResnetBlock2D(a, b, groups) for a, b in zip(widths, widths[1:]))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * latent_channels, H/d, W/d): the posterior's mean and log-variance."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        widths, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(
                widths[max(i - 1, 0)], w, cfg.layers_per_block, g, downsample=i < len(widths) - 1
            )
            for i, w in enumerate(widths)
        )
        self.mid_block = UNetMidBlock2D(widths[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, out_channels, h*d, w*d)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        widths, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(widths[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                widths[max(i - 1, 0)], w, cfg.layers_per_block + 1, g, upsample=i < len(widths) - 1
            )
            for i, w in enumerate(widths)
        )
        self.conv_norm_out = nn.GroupNorm(g, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# ---- the autoencoder --------------------------------------------------------------------------


@dataclass
class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, exp(logvar)), per latent element."""

    mean: torch.Tensor  # (B, C, h, w)
    logvar: torch.Tensor  # (B, C, h, w), clamped to [-30, 20]

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) in nats, summed over each image's latent -> (B,)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        L = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(L, L, 1) if cfg.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, C, H, W) in [-1, 1] -> the posterior over (B, latent_channels, H/d, W/d)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, h, w) -> (B, C, h*d, w*d), unclamped."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x through a posterior sample (training); returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---- the diffusers directory format -----------------------------------------------------------


def is_diffusers_dir(path: Path) -> bool:
    return (Path(path) / DIFFUSERS_WEIGHTS).is_file()


def rename_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map older diffusers attention names (`...attentions.0.query.weight`) to the current ones."""
    out = {}
    for key, value in state.items():
        *head, name, kind = key.split(".")
        if "attentions" in head and name in LEGACY_ATTENTION_NAMES:
            key = ".".join([*head, LEGACY_ATTENTION_NAMES[name], kind])
        out[key] = value
    return out


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict(strict=True) whose error lists the first names that differ, and the file."""
    expected, found = set(model.state_dict()), set(state)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the VAE its config describes: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(f"{source}: tensor shapes differ from the config's: {wrong[:3]}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def load_diffusers_vae(path: Path) -> AutoencoderKL:
    """A diffusers-format VAE directory (config.json + diffusion_pytorch_model.safetensors) -> float32, eval mode."""
    path = Path(path)
    for name in (DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} not found: a diffusers VAE directory holds "
                f"{DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS}"
            )
    try:
        cfg = AutoencoderKLConfig.from_json(json.loads((path / DIFFUSERS_CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path / DIFFUSERS_CONFIG}: {e}") from None
    model = AutoencoderKL(cfg)
    load_state_strict(
        model,
        rename_legacy_keys(safetensors.torch.load_file(path / DIFFUSERS_WEIGHTS)),
        path / DIFFUSERS_WEIGHTS,
    )
    return model.eval()


def save_diffusers_vae(model: AutoencoderKL, path: Path) -> None:
    """Write `model` as a diffusers-format directory (what diffusers' from_pretrained reads)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / DIFFUSERS_CONFIG).write_text(json.dumps(model.cfg.to_json(), indent=2) + "\n")
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(weights, path / DIFFUSERS_WEIGHTS)
