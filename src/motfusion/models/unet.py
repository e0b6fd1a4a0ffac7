"""Transfusion's U-Net patcher: convolutional down blocks before the transformer, up blocks after it.

The linear patcher maps each k x k patch to one vector independently. The U-Net instead halves the
resolution log2(k) times with timestep-conditioned residual blocks until the feature grid is the patch
grid, so each token summarises its patch with a receptive field that reaches its neighbours. On the way
out, the up blocks undo the downsampling and read the down path's activations through skip connections,
so fine detail need not squeeze through the backbone. This is what lets Transfusion use 4x4 or 8x8
patches (4 or 16 times fewer tokens than 2x2) and keep image quality.

`embed` returns the tokens and a `Skips` object (the down path's activations and the timestep
embedding); the model hands it to `predict` within the same forward call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from motfusion.models.adapters import TimestepEmbedding


@dataclass
class Skips:
    # level i: (N, C_i, H / (f 2^i), W / (f 2^i)), for every level above the patch grid
    features: list[torch.Tensor]
    time: torch.Tensor  # (N, E) the conditioning every block reads


def group_norm(channels: int) -> nn.GroupNorm:
    """About 4 channels per group, at most 32 groups (DDPM uses 32 groups of 4 at its base width)."""
    return nn.GroupNorm(math.gcd(max(channels // 4, 1), 32), channels)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; the timestep scales and shifts the second norm (adaptive GroupNorm)."""

    def __init__(self, c_in: int, c_out: int, time_dim: int):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, 2 * c_out)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """x: (N, C_in, h, w), time: (N, E), or (N, E, h', w') for a conditioning per region, with h', w'
        dividing h, w (each cell covers its block of pixels) -> (N, C_out, h, w)."""
        y = self.conv1(F.silu(self.norm1(x)))  # (N, C_out, h, w)
        if time.dim() == 2:
            mod = self.time(time)[:, :, None, None]  # (N, 2 C_out, 1, 1)
        else:  # linear per cell, then each cell spread over its pixels (the map is linear, so this is exact)
            mod = F.interpolate(
                self.time(time.movedim(1, -1)).movedim(-1, 1), size=y.shape[-2:], mode="nearest"
            )
        scale, shift = mod.chunk(2, dim=1)  # (N, C_out, 1 or h, 1 or w) each
        y = self.conv2(F.silu(self.norm2(y) * (1 + scale) + shift))
        return self.shortcut(x) + y


class Level(nn.Module):
    """The residual blocks at one resolution; the first one may take extra (skip) input channels."""

    def __init__(self, c_in: int, c: int, n_blocks: int, time_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c_in if i == 0 else c, c, time_dim) for i in range(n_blocks))

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, time)
        return x


class UNetPatcher(nn.Module):
    """Same interface as LinearPatcher, except that `embed` also returns the `Skips` that `predict` takes.

    A level at resolution H / 2^j has width `width * 2^min(j, 2)`; resolution H / k is the patch grid.
    With `fold` f > 1 each f x f block of pixels is folded into channels first (pixel unshuffle) and
    unfolded from the output: the same U-Net without its levels finer than H / f, which on 32px
    images are the most expensive ones.
    """

    def __init__(
        self,
        *,
        channels: int,
        patch_size: int,
        dim: int,
        width: int,
        blocks: int,
        pooled: bool = False,
        local: bool = False,
        fold: int = 1,
    ):
        super().__init__()
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"the U-Net patcher needs a power-of-2 model.patch_size, got {patch_size}")
        if fold < 1 or fold & (fold - 1) or fold > patch_size:
            raise ValueError(f"the U-Net's fold must be a power of 2 up to model.patch_size, got {fold}")
        self.k, self.channels, self.fold = patch_size, channels, fold
        first = fold.bit_length() - 1  # log2 of the first level's downsampling
        self.levels = patch_size.bit_length() - 1 - first
        widths = [width * 2 ** min(j, 2) for j in range(first, first + self.levels + 1)]
        time_dim = 4 * width
        self.time = TimestepEmbedding(time_dim)

        self.stem = nn.Conv2d(channels * fold**2, widths[0], 3, padding=1)
        self.down = nn.ModuleList(Level(c, c, blocks, time_dim) for c in widths)
        self.downsample = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths, widths[1:])
        )
        self.to_tokens = nn.Conv2d(widths[-1], dim, 1)  # a per-position linear map at the patch grid
        self.time_to_tokens = nn.Linear(
            time_dim, dim
        )  # the backbone sees t directly, as with the linear patcher

        self.from_tokens = nn.Conv2d(dim, widths[-1], 1)
        # model.unet_pooled: the mean of the image's hidden states joins the timestep in every up block's
        # adaptive norms, a direct path from the backbone (and the caption it read) to all resolutions.
        self.pooled = nn.Linear(dim, time_dim) if pooled else None
        # model.unet_local: the same path per patch, each hidden state conditioning the up blocks over its
        # own patch's pixels, so that two objects of a scene need not share one conditioning (SPADE-like).
        self.local = nn.Linear(dim, time_dim) if local else None
        # Indexed by level like the down path; every level above the patch grid concatenates its skip.
        self.up = nn.ModuleList(
            Level(c if i == self.levels else 2 * c, c, blocks, time_dim) for i, c in enumerate(widths)
        )
        self.upsample = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(b, a, 3, padding=1))
            for a, b in zip(widths, widths[1:])
        )
        self.out_norm = group_norm(widths[0])
        # Activations are stored channels last (N, H, W, C in memory): oneDNN's convolutions and the
        # GroupNorm kernels run faster so on CPU (a make-demo step 6% faster); the tokens come out of
        # and go into that layout without a copy. The output is contiguous NCHW again.
        self.memory_format = torch.channels_last
        # Zero-initialised by the model; its f^2 output channels per color are unfolded into pixels.
        self.proj_out = nn.Conv2d(widths[0], channels * fold**2, 3, padding=1)

    def tokens_per_image(self, height: int, width: int) -> int:
        return (height // self.k) * (width // self.k)

    def embed(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Skips]:
        """x_t: (N, C, H, W) noisy images, t: (N,) -> tokens (N, L, D) in raster order, and the skips."""
        time = F.silu(self.time(t))  # (N, E)
        x = F.pixel_unshuffle(x_t, self.fold).contiguous(memory_format=self.memory_format)
        x = self.stem(x)  # (N, C_0, H / f, W / f)
        features = []
        for i, level in enumerate(self.down):
            x = level(x, time)  # (N, C_i, H / (f 2^i), W / (f 2^i))
            if i < self.levels:
                features.append(x)
                x = self.downsample[i](x)  # (N, C_i+1, H / (f 2^(i+1)), W / (f 2^(i+1)))
        tokens = self.to_tokens(x).flatten(2).transpose(1, 2)  # (N, H/k * W/k, D)
        return tokens + self.time_to_tokens(time)[:, None, :], Skips(features, time)

    def predict(self, h: torch.Tensor, height: int, width: int, skips: Skips) -> torch.Tensor:
        """h: (N, L, D) hidden states at the image's patches, with embed's skips -> (N, C, H, W)."""
        N, L, D = h.shape
        time = skips.time if self.pooled is None else skips.time + self.pooled(h.mean(dim=1))  # (N, E)
        grid = (height // self.k, width // self.k)
        if self.local is not None:  # (N, E, H/k, W/k)
            time = time[:, :, None, None] + self.local(h).transpose(1, 2).reshape(N, -1, *grid)
        x = h.reshape(N, *grid, D).permute(0, 3, 1, 2)  # (N, D, H/k, W/k): channels last as it comes
        x = x.contiguous(memory_format=self.memory_format)
        x = self.up[self.levels](self.from_tokens(x), time)  # (N, C_n, H/k, W/k) at the patch grid
        for i in reversed(range(self.levels)):
            x = self.upsample[i](x)  # (N, C_i, H / (f 2^i), W / (f 2^i))
            x = self.up[i](torch.cat((x, skips.features[i]), dim=1), time)
        out = self.proj_out(F.silu(self.out_norm(x))).contiguous()
        return F.pixel_shuffle(out, self.fold)  # (N, C, H, W)
