"""An exponential moving average (EMA) of the weights, the copy that sampling uses.

After every applied optimizer step, each parameter's average moves toward it:

    ema <- d * ema + (1 - d) * p,    d = min(train.ema, (1 + step) / (w + step)),  w = train.ema_warmup

The warm-up of d (w = 10, as in torch-ema and diffusers) keeps a short run's average from
remembering the random initialisation: with a fixed d = 0.999, 2000 steps would leave 0.999^2000 =
13% of it in. While it rules, the average spans about step / (w - 1) steps, whatever train.ema says:
with w = 10 a decay of 0.995 is reached only at step 1,790, so a run of 1,400 steps averages the
same with any train.ema of 0.9937 or more. It reaches train.ema at step (w d - 1) / (1 - d): a
smaller w, sooner (w = 2, d = 0.995: step 198).

The average is kept in fp32, one tensor per parameter, laid out like the parameter: under FSDP each
rank averages its own shards (DTensors), so the update needs no communication. Keys are the
model's state-dict names (training/checkpoint.py saves them as `ema.safetensors`, or under "ema"
in a sharded checkpoint), so the average loads into a fresh model like the weights do.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor


def ema_decay(decay: float, step: int, warmup: float = 10.0) -> float:
    """The decay applied at (1-based) `step`: train.ema, warmed up over the first steps (train.ema_warmup)."""
    return min(decay, (1 + step) / (warmup + step))


class EMA:
    """The moving average of `model`'s parameters; `update(step)` after each applied step."""

    def __init__(self, model: nn.Module, decay: float, warmup: float = 10.0):
        if not 0.0 < decay < 1.0 or warmup <= 1.0:
            raise ValueError(f"EMA decay must be in (0, 1) and its warm-up > 1, got {decay} and {warmup}")
        self.decay, self.warmup = decay, warmup
        self.live = get_model_state_dict(model)  # name -> the parameter's own data (shards under FSDP)
        self.shadow = {k: v.detach().clone().float() for k, v in self.live.items()}
        self._pairs = ([self.shadow[k] for k in self.live], [self.live[k] for k in self.live])  # for update

    @torch.no_grad()
    def restart(self) -> None:
        """The average of nothing yet: the weights as they are now."""
        for k, v in self.live.items():
            self.shadow[k].copy_(v)

    @torch.no_grad()
    def update(self, step: int) -> None:
        averages, weights = self._pairs
        torch._foreach_lerp_(
            averages, [w.float() for w in weights], 1.0 - ema_decay(self.decay, step, self.warmup)
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> average, laid out like the parameters (DTensor shards under FSDP)."""
        return self.shadow

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """name -> whole average on the CPU; collective under FSDP (every rank must call it)."""
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Averages from a checkpoint: full tensors (sharded here if the parameters are) or shards."""
        missing, extra = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
        if missing or extra:
            raise KeyError(f"EMA tensors missing: {sorted(missing)[:4]}, unexpected: {sorted(extra)[:4]}")
        for k, dst in self.shadow.items():
            dst.copy_(_laid_out_like(state[k], dst))


def _laid_out_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor `full` laid out as `like` is: `like`'s own shard of it when `like` is a DTensor."""
    if isinstance(like, DTensor) and not isinstance(full, DTensor):
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
    return full
