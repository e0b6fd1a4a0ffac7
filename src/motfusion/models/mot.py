"""The Mixture-of-Transformers backbone.

Every non-embedding weight (Q/K/V/O projections, FFN, norms) can be separate per tower, while
attention is one softmax over the whole mixed sequence. Each component keeps its weights in a
ModuleDict keyed by tower name when it is untied, or under the single key "shared" when it is tied;
`model.untie = ()` is the dense baseline, with the same FLOPs per token.

Routing: each tower's positions (precomputed flat indices) are gathered into a contiguous buffer,
run through that tower's weights, and scattered back. No boolean masks, no host syncs.

With `model.text_moe_experts`, the FFN that serves text is a mixture of experts (models/moe.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from motfusion.config import ModelConfig
from motfusion.models.attention import attend
from motfusion.models.layers import RMSNorm, SwiGLU, apply_rope
from motfusion.models.moe import MoEFFN

SHARED = "shared"

# tower name -> flat positions (into B * T) of that tower's tokens; None = one shared tower (dense)
Route = dict[str, torch.Tensor] | None


def tower_names(cfg: ModelConfig) -> list[str]:
    return list(dict.fromkeys(cfg.towers.values()))


def is_untied(cfg: ModelConfig, component: str) -> bool:
    return component in cfg.untie and len(tower_names(cfg)) > 1


def weight_key(cfg: ModelConfig, component: str, tower: str) -> str:
    """Which entry of a component's ModuleDict serves `tower`."""
    return tower if is_untied(cfg, component) else SHARED


def per_tower(cfg: ModelConfig, component: str, make: Callable[[], nn.Module]) -> nn.ModuleDict:
    keys = tower_names(cfg) if is_untied(cfg, component) else [SHARED]
    return nn.ModuleDict({k: make() for k in keys})


def routed(x: torch.Tensor, route: Route, fn: Callable[[str, torch.Tensor], torch.Tensor], out_dim: int) -> torch.Tensor:
    """Apply fn(tower, x_tower) to each tower's rows of x (N, D) and scatter back -> (N, out_dim)."""
    if route is None:
        return fn(SHARED, x)
    out = x.new_empty(x.shape[0], out_dim)
    for tower, idx in route.items():
        if idx.numel():  # shape metadata only: no host sync
            out = out.index_copy(0, idx, fn(tower, x.index_select(0, idx)))
    return out


class MoTBlock(nn.Module):
    """Pre-norm Llama block whose weights are chosen per tower, with one global attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, hd = cfg.dim, cfg.head_dim
        self.attn_norm = per_tower(cfg, "norm", lambda: RMSNorm(D, cfg.norm_eps))
        self.ffn_norm = per_tower(cfg, "norm", lambda: RMSNorm(D, cfg.norm_eps))
        self.wqkv = per_tower(cfg, "attn", lambda: nn.Linear(D, 3 * D, bias=False))
        self.wo = per_tower(cfg, "attn", lambda: nn.Linear(D, D, bias=False))
        self.ffn = per_tower(cfg, "ffn", lambda: SwiGLU(D, cfg.hidden_dim))
        if cfg.text_moe_experts:  # MoT's hybrid: the FFN that serves text becomes a mixture of experts
            text_ffn = weight_key(cfg, "ffn", cfg.towers["text"])
            self.ffn[text_ffn] = MoEFFN(D, cfg.hidden_dim, cfg.text_moe_experts, cfg.moe_top_k)
        if cfg.qk_norm:  # per-head norms on q and k; they are norms, so they follow `untie=norm`
            self.q_norm = per_tower(cfg, "norm", lambda: RMSNorm(hd, cfg.norm_eps))
            self.k_norm = per_tower(cfg, "norm", lambda: RMSNorm(hd, cfg.norm_eps))

    def _key(self, component: str, tower: str) -> str:
        return weight_key(self.cfg, component, tower)

    def _qkv(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        norm, attn = self._key("norm", tower), self._key("attn", tower)
        qkv = self.wqkv[attn](self.attn_norm[norm](x))  # (n, 3D)
        if not self.cfg.qk_norm:
            return qkv
        q, k, v = qkv.unflatten(-1, (3, self.cfg.n_heads, self.cfg.head_dim)).unbind(1)  # (n, H, hd) each
        return torch.cat((self.q_norm[norm](q).flatten(1), self.k_norm[norm](k).flatten(1), v.flatten(1)), dim=-1)

    def _ffn(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        return self.ffn[self._key("ffn", tower)](self.ffn_norm[self._key("norm", tower)](x))

    def forward(self, x: torch.Tensor, route: Route, rope: tuple[torch.Tensor, torch.Tensor], mask,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: (B, T, D). kv: cached (k, v) of earlier positions, (B, H, Tc, hd) each.
        Returns the new x and this pass's full (k, v), cached part included."""
        B, T, D = x.shape
        H, hd = self.cfg.n_heads, self.cfg.head_dim
        xf = x.reshape(B * T, D)
        qkv = routed(xf, route, self._qkv, 3 * D).view(B, T, 3, H, hd)
        q, k, v = qkv.unbind(2)  # (B, T, H, hd) each
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if kv is not None:
            k, v = torch.cat((kv[0], k), dim=2), torch.cat((kv[1], v), dim=2)  # (B, H, Tc + T, hd)
        y = attend(q, k, v, mask).transpose(1, 2).reshape(B * T, D)
        xf = xf + routed(y, route, lambda t, ys: self.wo[self._key("attn", t)](ys), D)
        xf = xf + routed(xf, route, self._ffn, D)
        return xf.view(B, T, D), (k, v)


class MoTBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(MoTBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = per_tower(cfg, "norm", lambda: RMSNorm(cfg.dim, cfg.norm_eps))

    @property
    def is_dense(self) -> bool:
        return not any(is_untied(self.cfg, c) for c in self.cfg.untie)

    def route(self, modality_index: dict[str, torch.Tensor]) -> Route:
        """Merge per-modality positions into per-tower positions (modalities may share a tower)."""
        if self.is_dense:
            return None
        present = {m: idx for m, idx in modality_index.items() if idx.numel()}
        unknown = sorted(set(present) - set(self.cfg.towers))
        if unknown:
            raise ValueError(f"modalities {unknown} have no tower in model.towers={self.cfg.towers}")
        route = {}
        for tower in tower_names(self.cfg):
            parts = [present[m] for m, t in self.cfg.towers.items() if t == tower and m in present]
            route[tower] = torch.cat(parts) if parts else next(iter(modality_index.values())).new_empty(0)
        return route

    def forward(self, x: torch.Tensor, route: Route, rope, mask, cache: list | None = None) -> tuple[torch.Tensor, list]:
        """x: (B, T, D) -> (B, T, D) after the final norm, plus each layer's (k, v)."""
        B, T, D = x.shape
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, route, rope, mask, cache[i] if cache else None)
            kvs.append(kv)
        norm = lambda t, xs: self.final_norm[weight_key(self.cfg, "norm", t)](xs)
        return routed(x.reshape(B * T, D), route, norm, D).view(B, T, D), kvs
