"""The unified model: modality adapters around one MoT backbone.

`forward` maps a packed batch (plus the noisy images and their timesteps) to per-modality outputs:
hidden states for the token heads and a prediction per image. Each discrete modality (text, and those
in `model.vocab_sizes`) has its own embedding table and head; `logits(hidden, modality)` picks it. The objective (motfusion.objectives)
turns those into losses; the samplers (motfusion.sampling) call the model with a KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from motfusion.config import ModelConfig
from motfusion.errors import ConfigError
from motfusion.models.adapters import LinearPatcher, TokenAdapter
from motfusion.models.attention import SeqMeta, build_mask, resolve_backend
from motfusion.models.layers import grid_positions, rope_angles
from motfusion.models.moe import MoEFFN
from motfusion.models.mot import MoTBackbone
from motfusion.models.unet import UNetPatcher
from motfusion.sequence import SPECS, Batch


@dataclass
class ModelOutput:
    hidden: torch.Tensor  # (B, T, D) after each tower's final norm
    image: torch.Tensor  # (N, C, H, W) the diffusion prediction for each image
    moe_balance: torch.Tensor | None = None  # () the text MoE's balance loss, mean over its layers


class KVCache:
    """Keys and values of the positions seen so far, with what the mask needs to know about them."""

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.meta: SeqMeta | None = None

    def __len__(self) -> int:
        return 0 if self.meta is None else self.meta.doc.shape[1]


def build_patcher(cfg: ModelConfig) -> LinearPatcher | UNetPatcher:
    if cfg.patcher == "unet":
        return UNetPatcher(
            channels=cfg.image_channels,
            patch_size=cfg.patch_size,
            dim=cfg.dim,
            width=cfg.unet_channels,
            blocks=cfg.unet_blocks,
            pooled=cfg.unet_pooled,
            local=cfg.unet_local,
            fold=cfg.unet_fold,
        )
    return LinearPatcher(cfg.image_channels, cfg.patch_size, cfg.dim)


def grid_rope_positions(batch: Batch, groups: list, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """model.rope_2d: the (B, T) positions of the two halves of RoPE's frequency pairs. A patch in
    row r, column c of an image whose first patch sits at position p0 gets p0 + r and p0 + c, so
    attention between patches sees their offset in rows and columns; every other position keeps its
    own on both halves. `groups`: batch.groups()."""
    flat = batch.pos.flatten()
    rows, cols = flat, flat
    for _, _, W, idx in groups:
        i = torch.arange(idx.shape[1], device=idx.device)
        p0 = flat[idx[:, :1]]  # (n, 1) each image's first position
        at = (idx.flatten(),)
        rows = rows.index_put(at, (p0 + i // (W // patch_size)).flatten())
        cols = cols.index_put(at, (p0 + i % (W // patch_size)).flatten())
    return rows.view_as(batch.pos), cols.view_as(batch.pos)


class TransfusionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        unknown = sorted(set(cfg.vocab_sizes) - set(SPECS))
        if unknown:
            raise ConfigError(
                f"model.vocab_sizes names unknown modalities {unknown}; registered: {list(SPECS)}"
            )
        self.text = TokenAdapter(vocab_size, cfg.dim)
        self.discrete = nn.ModuleDict(
            {m: TokenAdapter(SPECS[m].offset + n, cfg.dim) for m, n in cfg.vocab_sizes.items()}
        )
        self.image = None if "image" in self.discrete else build_patcher(cfg)  # continuous images only
        self.backbone = MoTBackbone(cfg)
        if cfg.align_dim:  # objective.contrastive_weight: CLIP's projections and learned temperature
            self.align = nn.ModuleDict(
                {m: nn.Linear(cfg.dim, cfg.align_dim, bias=False) for m in ("image", "text")}
            )
            self.align_scale = nn.Parameter(
                torch.tensor([math.log(1 / 0.07)])
            )  # (1,): FSDP shards no scalars
        self.apply(self._init)
        for name, p in self.named_parameters():  # scale residual projections by depth, as in GPT-2
            if ".blocks." in name and name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if self.image is not None:
            nn.init.zeros_(self.image.proj_out.weight)
            nn.init.zeros_(self.image.proj_out.bias)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(
        self,
        batch: Batch,
        images: torch.Tensor,
        t: torch.Tensor,
        cache: KVCache | None = None,
        commit: bool = True,
    ) -> ModelOutput:
        """batch: (B, T) positions; images: (N, C, H, W) noisy images at timesteps t: (N,).

        With a cache, the batch holds only the new positions and attends to the cached ones too;
        `commit=False` leaves the cache as it was (a denoising step that will be redone)."""
        B, T = batch.shape
        D = self.cfg.dim
        h = self._embed_tokens(batch)  # (B, T, D), continuous positions still zero
        N = images.shape[0]
        groups = list(batch.groups())  # one per image size
        skips = []  # the U-Net's skips of each group, for predict
        for rows, H, W, idx in groups:
            patches, s = self.image.embed(images[rows, :, :H, :W], t[rows])  # (n, L, D)
            if self.cfg.grid_pos:
                k = self.cfg.patch_size
                patches = patches + grid_positions(H // k, W // k, D, patches.device)  # (L, D) broadcast
            h = h.view(B * T, D).index_copy(0, idx.flatten(), patches.flatten(0, 1)).view(B, T, D)
            skips.append(s)

        past = len(cache) if cache is not None else 0
        index = torch.arange(past, past + T, device=h.device).expand(B, T)
        meta = SeqMeta(batch.doc, batch.image, index)
        keys = cache.meta.cat(meta) if past else meta
        backend = "sdpa" if cache is not None else resolve_backend(self.cfg.attention_backend, h.device)
        mask = build_mask(backend, meta, keys, self.cfg.image_attention == "bidirectional")
        pos, pos2 = batch.pos, None
        if self.cfg.rope_2d:
            pos, pos2 = grid_rope_positions(batch, groups, self.cfg.patch_size)
        rope = rope_angles(pos, self.cfg.head_dim, self.cfg.rope_theta, pos2)  # (B, T, hd / 2) each
        route = self.backbone.route(batch.modality_index)

        moes = [m for m in self.backbone.modules() if isinstance(m, MoEFFN)]
        for moe in moes:
            moe.balance = None
        h, kvs = self.backbone(h, route, rope, mask, cache.layers if past else None)
        balance = [moe.balance for moe in moes if moe.balance is not None]  # none if no text token ran
        if cache is not None and commit:
            cache.layers, cache.meta = kvs, keys

        if N:
            Hmax, Wmax = images.shape[-2:]
            preds = [
                self.image.predict(h.view(B * T, D)[idx], H, W, s) for (_, H, W, idx), s in zip(groups, skips)
            ]
            preds = [
                p
                if p.shape[-2:] == (Hmax, Wmax)
                else F.pad(p, (0, Wmax - p.shape[-1], 0, Hmax - p.shape[-2]))
                for p in preds
            ]  # smaller sizes: zero-padded like `images`
            image_out = torch.cat(preds) if len(preds) > 1 else preds[0]  # (N, C, H, W), padded like images
        else:
            image_out = images
        return ModelOutput(
            hidden=h, image=image_out, moe_balance=torch.stack(balance).mean() if balance else None
        )

    @property
    def token_modalities(self) -> list[str]:
        """The discrete modalities, text first; each has an embedding table and a head."""
        return ["text", *self.discrete]

    def adapter(self, modality: str) -> TokenAdapter:
        return self.text if modality == "text" else self.discrete[modality]

    def _embed_tokens(self, batch: Batch) -> torch.Tensor:
        """Gather each discrete modality's positions, look up its own table, scatter -> (B, T, D)."""
        B, T = batch.shape
        continuous = {"image"} if self.image is not None else set()
        missing = [
            m
            for m, idx in batch.modality_index.items()
            if idx.numel() and m not in self.token_modalities and m not in continuous
        ]
        if missing:
            raise ValueError(
                f"the batch has {missing} positions but the model has no vocabulary for them; "
                f"give each a size in model.vocab_sizes (e.g. {missing[0]}:500)"
            )
        tokens = batch.tokens.flatten()
        h = self.text.embed.weight.new_zeros(B * T, self.cfg.dim)
        for m in self.token_modalities:
            idx = batch.modality_index.get(m)
            if idx is not None and idx.numel():  # shape metadata only: no host sync
                h = h.index_copy(0, idx, self.adapter(m).embed(tokens.index_select(0, idx)))
        return h.view(B, T, self.cfg.dim)

    def logits(self, hidden: torch.Tensor, modality: str = "text") -> torch.Tensor:
        """(..., D) -> (..., V_modality), with the head of `modality`."""
        return self.adapter(modality).head(hidden)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V)."""
        return self.logits(hidden, "text")

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            adapters = [self.text, self.discrete] + ([self.image] if self.image is not None else [])
            n -= sum(p.numel() for a in adapters for p in a.parameters())
        return n
