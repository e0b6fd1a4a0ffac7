"""The Mixture-of-Transformers backbone.

Every non-embedding weight (Q/K/V/O projections, FFN, norms) can be separate per tower, while
attention is one softmax over the whole mixed sequence. Each component keeps its weights in a
ModuleDict keyed by tower name when it is untied, or under the single key "shared" when it is tied;
`model.untie = ()` is the dense baseline, with the same FLOPs per token. A step whose weights are
all shared (the attention's norm and projections under `model.untie=ffn`, say) runs once on the
whole stream.

Routing: once per forward, `MoTBackbone.route` orders the B * T positions tower by tower (a
`Route`). The backbone keeps its residual stream (and RoPE angles) in that order, so each tower's
tokens are one contiguous slice and every per-tower weight runs on a view, with no gather or
scatter. Only attention mixes towers: document buckets (models/attention.py) gather q, k, v
straight from tower order, as they would from row order; a dense mask, a BlockMask or the KV cache
takes q, k, v back to row order and the output forward again, one gather each way per layer
(its backward a gather too). No boolean masks, no host syncs.

With `model.text_moe_experts`, the FFN that serves text is a mixture of experts (models/moe.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from motfusion.config import ModelConfig
from motfusion.models.attention import DocumentBuckets, attend
from motfusion.models.layers import RMSNorm, SwiGLU, apply_rope, gather_rows
from motfusion.models.moe import MoEFFN

SHARED = "shared"


@dataclass(frozen=True)
class Route:
    """Which tower serves each of a pass's N = B * T positions; None instead of a Route: dense.

    `order` lists the flat row-major positions tower by tower (`sizes` tokens each, towers with no
    token left out); `inverse` is its inverse permutation. Both are None when one tower has every
    token. `sorted`: the residual stream is already in tower order (the backbone's); otherwise it is
    in row order (a block called on its own) and each per-tower step gathers in and out."""

    towers: tuple[str, ...]
    sizes: tuple[int, ...]
    order: torch.Tensor | None  # (N,)
    inverse: torch.Tensor | None  # (N,)
    sorted: bool = False


def split_towers(x: torch.Tensor, route: Route | None) -> list[tuple[str, torch.Tensor]]:
    """The stream x (N, ...) as (tower, its tokens) pairs; views when the stream is in tower order."""
    if route is None:
        return [(SHARED, x)]
    if route.order is None:
        return [(route.towers[0], x)]
    xs = x if route.sorted else gather_rows(x, route.order, route.inverse)  # (N, ...) tower order
    return list(zip(route.towers, xs.split(route.sizes)))


def join_towers(parts: list[torch.Tensor], route: Route | None) -> torch.Tensor:
    """Inverse of split_towers: per-tower (n_t, ...) -> the stream (N, ...)."""
    if route is None or route.order is None:
        return parts[0]
    out = torch.cat(parts)  # (N, ...) tower order
    return out if route.sorted else gather_rows(out, route.inverse, route.order)


def each_tower(
    x: torch.Tensor, route: Route | None, fn: Callable[[str, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply fn(tower, x_tower) to each tower's tokens of the stream x (N, D) -> (N, out), stream order."""
    return join_towers([fn(t, part) for t, part in split_towers(x, route)], route)


def to_rows(x: torch.Tensor, route: Route | None) -> torch.Tensor:
    """The stream's (N, ...) in row order (for attention)."""
    if route is None or route.order is None or not route.sorted:
        return x
    return gather_rows(x, route.inverse, route.order)


def to_stream(x: torch.Tensor, route: Route | None) -> torch.Tensor:
    """Row-order (N, ...) back into the stream's order."""
    if route is None or route.order is None or not route.sorted:
        return x
    return gather_rows(x, route.order, route.inverse)


def tower_names(cfg: ModelConfig) -> list[str]:
    return list(dict.fromkeys(cfg.towers.values()))


def is_untied(cfg: ModelConfig, component: str) -> bool:
    return component in cfg.untie and len(tower_names(cfg)) > 1


def step_route(cfg: ModelConfig, route: Route | None, *components: str) -> Route | None:
    """The route for a step whose weights are `components`: tower by tower when any of them is
    untied, else None, one call on the whole stream (a shared weight needs no split)."""
    return route if any(is_untied(cfg, c) for c in components) else None


def weight_key(cfg: ModelConfig, component: str, tower: str) -> str:
    """Which entry of a component's ModuleDict serves `tower`."""
    return tower if is_untied(cfg, component) else SHARED


def per_tower(cfg: ModelConfig, component: str, make: Callable[[], nn.Module]) -> nn.ModuleDict:
    keys = tower_names(cfg) if is_untied(cfg, component) else [SHARED]
    return nn.ModuleDict({k: make() for k in keys})


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
        return torch.cat(
            (self.q_norm[norm](q).flatten(1), self.k_norm[norm](k).flatten(1), v.flatten(1)), dim=-1
        )

    def _out(self, tower: str, y: torch.Tensor) -> torch.Tensor:
        return self.wo[self._key("attn", tower)](y)

    def _ffn(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        return self.ffn[self._key("ffn", tower)](self.ffn_norm[self._key("norm", tower)](x))

    def forward(
        self,
        x: torch.Tensor,
        route: Route | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple | None]:
        """x: (B, T, D) and rope's cos, sin: (B, T, hd / 2), their B * T positions in the route's
        stream order (row order unless the backbone sorted them). kv: cached (k, v) of earlier
        positions, (B, H, Tc, hd) each. Returns the new x, same order, and this pass's full (k, v) in
        row order, cached part included (None when attention ran on document buckets)."""
        B, T, D = x.shape
        H, hd = self.cfg.n_heads, self.cfg.head_dim
        x = x.reshape(B * T, D)
        qkv = each_tower(x, step_route(self.cfg, route, "norm", "attn"), self._qkv)  # (N, 3D)
        q, k, v = qkv.view(B, T, 3, H, hd).unbind(2)  # (B, T, H, hd) each
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y, kv = self._attention(q, k, v, route, mask, kv)  # (N, D)
        x = x + each_tower(y, step_route(self.cfg, route, "attn"), self._out)
        x = x + each_tower(x, step_route(self.cfg, route, "norm", "ffn"), self._ffn)
        return x.view(B, T, D), kv

    def _attention(self, q, k, v, route: Route | None, mask, kv) -> tuple[torch.Tensor, tuple | None]:
        """q, k, v: (B, T, H, hd) in stream order -> (B * T, D) in stream order, and (k, v) as forward returns them."""
        B, T, H, hd = q.shape
        q, k, v = (t.reshape(B * T, H, hd) for t in (q, k, v))
        if isinstance(mask, DocumentBuckets):  # gathers straight from the stream's order
            return mask.attend(q, k, v).view(B * T, H * hd), None
        q, k, v = (to_rows(t, route).view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if kv is not None:
            k, v = torch.cat((kv[0], k), dim=2), torch.cat((kv[1], v), dim=2)  # (B, H, Tc + T, hd)
        y = attend(q, k, v, mask).transpose(1, 2).reshape(B * T, H * hd)  # (N, D) row order
        return to_stream(y, route), (k, v)


class MoTBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(MoTBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = per_tower(cfg, "norm", lambda: RMSNorm(cfg.dim, cfg.norm_eps))

    @property
    def is_dense(self) -> bool:
        return not any(is_untied(self.cfg, c) for c in self.cfg.untie)

    def route(self, modality_index: dict[str, torch.Tensor]) -> Route | None:
        """Order the positions tower by tower (modalities may share a tower); None when dense."""
        if self.is_dense:
            return None
        present = {m: idx for m, idx in modality_index.items() if idx.numel()}  # shape metadata: no sync
        unknown = sorted(set(present) - set(self.cfg.towers))
        if unknown:
            raise ValueError(f"modalities {unknown} have no tower in model.towers={self.cfg.towers}")
        parts = {}
        for tower in tower_names(self.cfg):
            mine = [present[m] for m, t in self.cfg.towers.items() if t == tower and m in present]
            if mine:
                parts[tower] = torch.cat(mine) if len(mine) > 1 else mine[0]
        towers, sizes = tuple(parts), tuple(p.numel() for p in parts.values())
        if len(parts) < 2:
            return Route(towers, sizes, None, None)
        order = torch.cat(list(parts.values()))  # (N,)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return Route(towers, sizes, order, inverse)

    def forward(
        self, x: torch.Tensor, route: Route | None, rope, mask, cache: list | None = None
    ) -> tuple[torch.Tensor, list]:
        """x: (B, T, D) -> (B, T, D) after the final norm, plus each layer's (k, v). In between, the
        residual stream is in tower order."""
        B, T, D = x.shape
        if route is not None and route.order is not None:  # the stream, rope and buckets in tower order
            route = replace(route, sorted=True)
            x = to_stream(x.reshape(B * T, D), route).view(B, T, D)
            rope = tuple(to_stream(r.reshape(B * T, -1), route).view_as(r) for r in rope)
            if isinstance(mask, DocumentBuckets):
                mask = mask.reorder(route.order, route.inverse)
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, route, rope, mask, cache[i] if cache else None)
            kvs.append(kv)
        norm = lambda t, xs: self.final_norm[weight_key(self.cfg, "norm", t)](xs)
        x = each_tower(x.reshape(B * T, D), step_route(self.cfg, route, "norm"), norm)
        return to_rows(x, route).view(B, T, D), kvs
