"""Muon for the backbone's weight matrices, AdamW for every other parameter, as one optimizer
(`train.optimizer=muon`).

Muon (Jordan et al., 2024) replaces the update of a 2-D weight by its momentum orthogonalized: the
nearest semi-orthogonal matrix, which a few Newton-Schulz iterations approximate. Every direction of
the update then moves by about as much, where Adam's is dominated by a few. The step is scaled to
AdamW's update RMS (0.2 * sqrt(max(rows, cols)), "Muon is Scalable for LLM Training", Liu et al.,
2025), so train.lr, the schedule and train.weight_decay keep their AdamW meaning. Embeddings, heads,
norms, biases and the image patcher stay on AdamW, as in every Muon recipe; with train.muon_convs the
U-Net's conv filters join Muon, each as the matrix (out, in k k), as in Muon's CIFAR-10 runs.

Under FSDP each rank orthogonalizes the whole matrix (gathered) and keeps its own shard of the
result, so 2 ranks step as 1 process does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.adamw import adamw

# Newton-Schulz quintic coefficients (Jordan et al.): they push every singular value of the
# normalized matrix into about [0.7, 1.2] in five iterations, faster than converging to exactly 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MOMENTUM = 0.95


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Each matrix of `g` (..., m, n) with its singular values pushed toward 1 (U V^T of its SVD,
    approximately). In bf16 on CUDA, fp32 elsewhere (CPUs without AMX are slow in bf16)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32).reshape(-1, *g.shape[-2:])  # (k, m, n)
    wide = x.shape[-2] <= x.shape[-1]
    x = x if wide else x.mT.contiguous()  # iterate on the smaller Gram matrix
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        # a x + (b G + c G G) x, each product fused with its sum: for the demo's 24 matrices of
        # 128 x 384, 21 against 29 ms with separate ops on 2 CPU threads (docs/RESULTS.md, "Speed and memory").
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.mT).reshape(g.shape).to(g.dtype)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """An FSDP-sharded tensor gathered (every rank gets the same matrix); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(update: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The whole `update` as `p` holds it: this rank's shard of a sharded parameter (a local slice)."""
    if not isinstance(p, DTensor):
        return update
    whole = DTensor.from_local(update, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
    return whole.redistribute(p.device_mesh, p.placements)


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with `muon=True` step with Muon (momentum MOMENTUM, Nesterov), the others with
    AdamW (fused). Each group has its own lr and weight_decay, as with torch.optim.AdamW."""

    def __init__(
        self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float = 1e-8
    ):
        for group in groups:
            if group.get("muon") and any(p.ndim not in (2, 4) for p in group["params"]):
                raise ValueError("Muon steps 2-D weight matrices and 4-D conv filters only")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, muon=False)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """`closure` must be None (torch.distributed.checkpoint passes it so, stepping once to create
        the state it loads into); the training loop has none."""
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)

    def _muon(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Matrices of one shape are orthogonalized as one batch (MoT's towers have many alike); a conv
        filter (out, in, k, k) as the matrix (out, in k k)."""
        lr, decay = group["lr"], group["weight_decay"]
        by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(MOMENTUM).add_(p.grad)
            nesterov = p.grad.add(buf, alpha=MOMENTUM)
            by_shape.setdefault(tuple(p.shape), []).append((p, _whole(nesterov)))
        for shape, pairs in by_shape.items():
            updates = orthogonalize(torch.stack([g.flatten(1) for _, g in pairs]))  # (n, out, in k k)
            for (p, _), update in zip(pairs, updates):
                p.mul_(1 - lr * decay)
                p.add_(_like(update.reshape(shape), p), alpha=-lr * 0.2 * math.sqrt(max(update.shape)))

    def _adamw(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if "step" not in state:  # as torch.optim.AdamW keeps it with fused=True
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            fused=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
