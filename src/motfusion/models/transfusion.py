"""The unified model: modality adapters around one MoT backbone.

`forward` maps a packed batch (plus the noisy images and their timesteps) to per-modality outputs:
hidden states for the token heads and a prediction per image. The objective (motfusion.objectives)
turns those into losses; the samplers (motfusion.sampling) call the model with a KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from motfusion.config import ModelConfig
from motfusion.models.adapters import LinearPatcher, TextAdapter
from motfusion.models.attention import SeqMeta, build_mask, resolve_backend
from motfusion.models.layers import rope_angles
from motfusion.models.mot import MoTBackbone
from motfusion.sequence import Batch


@dataclass
class ModelOutput:
    hidden: torch.Tensor  # (B, T, D) after each tower's final norm
    image: torch.Tensor  # (N, C, H, W) the diffusion prediction for each image


class KVCache:
    """Keys and values of the positions seen so far, with what the mask needs to know about them."""

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.meta: SeqMeta | None = None

    def __len__(self) -> int:
        return 0 if self.meta is None else self.meta.doc.shape[1]


class TransfusionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.text = TextAdapter(vocab_size, cfg.dim)
        self.image = LinearPatcher(cfg.image_channels, cfg.patch_size, cfg.dim)
        self.backbone = MoTBackbone(cfg)
        self.apply(self._init)
        for name, p in self.named_parameters():  # scale residual projections by depth, as in GPT-2
            if ".blocks." in name and name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        nn.init.zeros_(self.image.proj_out.weight)
        nn.init.zeros_(self.image.proj_out.bias)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, batch: Batch, images: torch.Tensor, t: torch.Tensor,
                cache: KVCache | None = None, commit: bool = True) -> ModelOutput:
        """batch: (B, T) positions; images: (N, C, H, W) noisy images at timesteps t: (N,).

        With a cache, the batch holds only the new positions and attends to the cached ones too;
        `commit=False` leaves the cache as it was (a denoising step that will be redone)."""
        B, T = batch.shape
        D = self.cfg.dim
        h = self.text.embed(batch.tokens)  # (B, T, D)
        N = images.shape[0]
        if N:
            patches = self.image.embed(images, t)  # (N, L, D)
            h = h.view(B * T, D).index_copy(0, batch.image_index.flatten(), patches.flatten(0, 1)).view(B, T, D)

        past = len(cache) if cache is not None else 0
        index = torch.arange(past, past + T, device=h.device).expand(B, T)
        meta = SeqMeta(batch.doc, batch.image, index)
        keys = cache.meta.cat(meta) if past else meta
        backend = "sdpa" if cache is not None else resolve_backend(self.cfg.attention_backend, h.device)
        mask = build_mask(backend, meta, keys, self.cfg.image_attention == "bidirectional")
        rope = rope_angles(batch.pos, self.cfg.head_dim, self.cfg.rope_theta)  # (B, T, hd / 2) each
        route = self.backbone.route(batch.modality_index)

        h, kvs = self.backbone(h, route, rope, mask, cache.layers if past else None)
        if cache is not None and commit:
            cache.layers, cache.meta = kvs, keys

        if N:
            H, W = images.shape[-2:]
            image_out = self.image.predict(h.view(B * T, D)[batch.image_index], H, W)  # (N, C, H, W)
        else:
            image_out = images
        return ModelOutput(hidden=h, image=image_out)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V)."""
        return self.text.head(hidden)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in (*self.text.parameters(), *self.image.parameters()))
        return n
