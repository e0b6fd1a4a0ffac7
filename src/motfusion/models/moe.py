"""A mixture of SwiGLU experts: MoT's hybrid replaces the text tower's FFN with one.

A linear router scores the experts for each token; the token goes to its top-k experts and their
outputs are combined with the top-k router probabilities, rescaled to sum to 1. The rescaling is
held constant in the backward pass, so that with top-1 routing (a combine weight of exactly 1) the
router still learns from the task loss, as Switch's gate does, and not only from the balance loss.

Dispatch is dropless: assignments are sorted by expert and each expert runs on its contiguous
slice, so a token costs k expert FFNs (top-1: the FLOPs of one dense FFN) plus the router. The
slice sizes are read on the host: one sync per MoE layer, which grouped GEMMs would remove.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from motfusion.models.layers import SwiGLU


def balance_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss: E * sum_i f_i * P_i.

    probs: (n, E) router probabilities; experts: (n, k) chosen experts. f_i is the share of the
    n * k assignments that went to expert i (not differentiable), P_i the mean probability of
    expert i. It is 1 under uniform routing, and E when every token goes to one expert."""
    E = probs.shape[-1]
    share = torch.bincount(experts.flatten(), minlength=E).to(probs.dtype) / experts.numel()  # (E,)
    return E * (share * probs.mean(dim=0)).sum()


class MoEFFN(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden_dim) for _ in range(n_experts))
        self.balance: torch.Tensor | None = None  # the last forward's balance loss, read by the model

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (n, D) -> router probabilities (n, E), chosen experts (n, k), combine weights (n, k)."""
        probs = F.softmax(self.router(x).float(), dim=-1)  # (n, E)
        top_p, experts = probs.topk(self.top_k, dim=-1)  # (n, k) each
        weights = top_p / top_p.sum(dim=-1, keepdim=True).detach()
        return probs, experts, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, D) -> (n, D); sets `self.balance`."""
        probs, experts, weights = self.route(x)
        self.balance = balance_loss(probs, experts)
        flat = experts.flatten()  # (n * k,) assignment a belongs to token a // k
        order = flat.argsort(stable=True)
        token = order // self.top_k  # (n * k,) the token of each assignment, grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # host sync: slice sizes
        xs = x.index_select(0, token).split(counts)
        ys = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, xs)])  # (n * k, D)
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add(0, token, ys.to(x.dtype))
