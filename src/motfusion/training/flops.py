"""Training FLOPs per modality, and model FLOPs utilization (MFU).

A training step costs, for each real (non-padding) token of modality m,

    6 * N_m  +  12 * n_layers * dim * K  (+ the modality's adapter)

- N_m is the number of backbone parameters the token computes with: its own tower's entry of every
  per-tower weight (or the shared entry where a component is tied), final norm included; of a
  mixture of experts, the router and top_k experts. 6 = 2 FLOPs per multiply-add forward + 4
  backward (Kaplan et al., 2020). Norm gains count like weights: they are a rounding error of N.
- K is the number of keys the token attends to under the actual mask: itself and the earlier
  positions of its document, plus the later patches of its own image when image attention is
  bidirectional. Per layer, QK^T and AV cost 2 * dim * K each forward, times 3 with backward.
- Adapters: a discrete modality's head (text, speech units, ...) costs 6 * vocab * dim at each
  position whose target it predicts (the objective computes logits nowhere else), counted for that
  modality; embedding lookups cost nothing. The (continuous) image patcher's cost is
  measured, not derived from its parameter count (a U-Net's convolutions reuse each weight at every
  pixel): its linear and convolution layers are counted while a fresh copy of it runs embed +
  predict on one image on the host, times 3.

MoT keeps FLOPs per token equal to the dense model's: a token goes through one tower, whatever the
number of towers. Padding is not counted (it is computed, and wasted, so it lowers MFU), nor are
the keys the dense `sdpa` mask computes and discards: these are model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from motfusion.config import ModelConfig
from motfusion.models.moe import MoEFFN
from motfusion.models.mot import SHARED
from motfusion.models.transfusion import TransfusionModel, build_patcher
from motfusion.sequence import MODALITIES, Batch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, matched in order against the CUDA device name.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of a CUDA device, from PEAK_FLOPS; None on CPU or for a GPU not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def active_params(component: nn.Module) -> int:
    """Parameters one token computes with in a component: all of them, but for a mixture of experts
    its router and top_k of its experts."""
    if isinstance(component, MoEFFN):
        return _numel(component.router) + component.top_k * _numel(component.experts[0])
    return _numel(component)


def tower_params(model: TransfusionModel, modality: str) -> int:
    """Backbone parameters a token of `modality` computes with: its tower's entry of every per-tower
    ModuleDict (blocks and final norm), or the shared entry where the component is tied."""
    tower = model.cfg.towers.get(modality)
    return sum(
        active_params(sub)
        for mod in model.backbone.modules()
        if isinstance(mod, nn.ModuleDict)
        for key, sub in mod.items()
        if key in (SHARED, tower)
    )


def visible_keys(batch: Batch, bidirectional: bool) -> torch.Tensor:
    """(B, T) number of keys each position attends to: causal within its document, plus the later
    patches of its own image when `bidirectional`. Documents are contiguous runs of a row."""
    B, T = batch.doc.shape
    idx = torch.arange(T, device=batch.doc.device).expand(B, T)
    starts = torch.ones(B, T, dtype=torch.bool, device=batch.doc.device)
    starts[:, 1:] = batch.doc[:, 1:] != batch.doc[:, :-1]
    first = torch.where(starts, idx, 0).cummax(dim=1).values  # (B, T) first position of each document
    keys = (idx - first + 1).flatten()  # (B * T,)
    for _, _, _, idx in batch.groups() if bidirectional else ():
        L = idx.shape[1]
        later = torch.arange(L - 1, -1, -1, device=keys.device).expand_as(idx)  # (n, L)
        keys = keys.index_add(0, idx.flatten(), later.flatten())  # + patches after each one
    return keys.view(B, T)


@dataclass(frozen=True)
class BatchFlops:
    tokens: dict[str, int]  # real tokens per modality
    flops: dict[str, int]  # training FLOPs spent on them

    @property
    def total(self) -> int:
        return sum(self.flops.values())

    def per_token(self) -> dict[str, float]:
        return {m: self.flops[m] / n for m, n in self.tokens.items() if n}

    def as_counts(self) -> dict[str, int]:
        """Flat integers to sum over ranks: {"tokens/text": ..., "flops/text": ..., ...}."""
        return {
            **{f"tokens/{m}": n for m, n in self.tokens.items()},
            **{f"flops/{m}": f for m, f in self.flops.items()},
        }

    @classmethod
    def from_counts(cls, counts: dict[str, int]) -> BatchFlops:
        pick = lambda prefix: {k.removeprefix(prefix): v for k, v in counts.items() if k.startswith(prefix)}
        return cls(tokens=pick("tokens/"), flops=pick("flops/"))


def layer_flops(module: nn.Module, output: torch.Tensor) -> int:
    """Forward FLOPs of a linear or convolution layer from its output's shape (biases not counted)."""
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    if isinstance(module, nn.Conv2d):
        return 2 * output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
    return 0


def patcher_flops(cfg: ModelConfig, channels: int, height: int, width: int) -> int:
    """Forward FLOPs of the image patcher (embed, then predict) on one image."""
    with torch.random.fork_rng(devices=[]):  # its random init leaves the run's RNG stream untouched
        patcher = build_patcher(cfg)
    x_t, t = torch.zeros(1, channels, height, width), torch.zeros(1)
    total = 0

    def count(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        total += layer_flops(module, output)

    for module in patcher.modules():
        module.register_forward_hook(count)
    with torch.no_grad():
        tokens, skips = patcher.embed(x_t, t)
        patcher.predict(tokens, height, width, skips)
    return total


class FlopCounter:
    """The model's training FLOPs on packed batches (see the module docstring for the formula).

    `model` is the TransfusionModel itself, not a wrapper around it (FSDP-sharded is fine: a sharded
    parameter reports its full size).
    """

    def __init__(self, model: TransfusionModel):
        self.cfg = model.cfg
        self.token_params = {m: tower_params(model, m) for m in MODALITIES}
        self.head_params = {m: _numel(model.adapter(m).head) for m in model.token_modalities}
        self.continuous_images = model.image is not None
        self._patcher: dict[tuple[int, ...], int] = {}  # (C, H, W) -> training FLOPs per image

    def image_flops(self, shape: tuple[int, ...]) -> int:
        """Training FLOPs of the patcher on one image of `shape` (C, H, W)."""
        if shape not in self._patcher:
            self._patcher[shape] = 3 * patcher_flops(self.cfg, *shape)
        return self._patcher[shape]

    def count(self, batch: Batch) -> BatchFlops:
        """FLOPs of one training step (forward and backward) on `batch`, best counted on the host."""
        real = batch.doc >= 0  # (B, T)
        keys = visible_keys(batch, self.cfg.image_attention == "bidirectional")  # (B, T)
        tokens, flops = {}, {}
        for name, i in MODALITIES.items():
            mine = (batch.modality == i) & real
            tokens[name] = int(mine.sum())
            attention = 12 * self.cfg.n_layers * self.cfg.dim * int(keys[mine].sum())
            flops[name] = 6 * self.token_params[name] * tokens[name] + attention
        for name, params in self.head_params.items():
            flops[name] += 6 * params * batch.loss_index[name].numel()
        for rows, H, W, _ in batch.groups() if self.continuous_images else ():
            flops["image"] += self.image_flops((batch.images.shape[1], H, W)) * (rows.stop - rows.start)
        return BatchFlops(tokens=tokens, flops=flops)
