"""Llama building blocks: RMSNorm, rotary position embedding, SwiGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In fp32 whatever x's dtype (under bf16 autocast a matmul's output is bf16), returned as x's."""
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).type_as(x)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_angles(
    pos: torch.Tensor, head_dim: int, theta: float, pos2: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for integer positions `pos` (any shape) -> (*pos.shape, head_dim // 2) each.

    With `pos2` (pos's shape): 2D RoPE, the odd frequency pairs turn with pos2 instead, so each axis
    keeps a spread of frequencies. Where pos2 == pos it is the 1D rotation."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    pos = pos.float()[..., None]
    if pos2 is not None:
        odd = torch.arange(head_dim // 2, device=pos.device) % 2 == 1
        pos = torch.where(odd, pos2.float()[..., None], pos)  # (..., head_dim // 2)
    angles = pos * freqs
    return angles.cos(), angles.sin()


def grid_positions(rows: int, cols: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2D sin-cos embedding of a rows x cols patch grid in raster order -> (rows * cols, dim).

    The first half of the channels encodes the row, the second the column (as in MAE and DiT), at
    frequencies 1 / 100^(i / (dim / 4)): the shortest wavelength is 2 pi patches, so neighbours differ.
    The sequence's 1D RoPE alone tells an image token its raster index, not its row and column."""
    if dim % 4:
        raise ValueError(f"a 2D position embedding needs dim divisible by 4, got {dim}")
    freqs = 1.0 / 100 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    r, c = torch.meshgrid(
        torch.arange(rows, device=device, dtype=torch.float32),
        torch.arange(cols, device=device, dtype=torch.float32),
        indexing="ij",
    )
    angles = [axis.reshape(-1, 1) * freqs for axis in (r, c)]  # (rows * cols, dim / 4) each
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # (rows * cols, dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by angle i. x: (B, T, H, hd); cos, sin: (B, T, hd // 2).

    Eager: one complex multiply per pair, the same arithmetic as x1 cos - x2 sin, x1 sin + x2 cos in
    a third of the time on CPU. Compiled: real arithmetic, which inductor fuses (it does not
    generate code for complex numbers)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    if torch.compiler.is_compiling():
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, hd // 2) each
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, T, H, hd // 2, 2)
        return out.flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, hd // 2) complex
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[index] along dim 0, whose backward is the gather grad[inverse] (index_select's own backward
    is a scatter-add, slower on CPU). Exact when `index` is a permutation and `inverse` its inverse.

    Padding: `index` may also read a row again (a padding slot), and `inverse` may name one output
    row for several inputs; backward then ignores the padding slots' gradients, or hands them a
    copy of a real one. That is exact when nothing real depends on the padding slots, as in
    attention's document buckets, where a padding slot attends to padding only."""
    return _GatherRows.apply(x, index, inverse)
