"""Reverse-process samplers, diffusers style.

Evaluate the model at ``sampler.timesteps[i]`` (descending) and call
``sampler.step(model_out, i, x_t, generator)`` to get the next, less noisy, x.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from motfusion.diffusion.schedules import DDPM, DiffusionProcess, RectifiedFlow


def cfg(cond_out: Tensor, uncond_out: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: scale 1 is the conditional output, scale 0 the unconditional one."""
    return uncond_out + scale * (cond_out - uncond_out)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's own device."""
    source = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=source, dtype=x.dtype).to(x.device)


class Sampler(ABC):
    process_type: type[DiffusionProcess] = DiffusionProcess

    def __init__(self, process: DiffusionProcess, num_steps: int, clip_x0: bool = False) -> None:
        if not isinstance(process, self.process_type):
            raise TypeError(
                f"{type(self).__name__} needs a {self.process_type.__name__} process, got {process!r}"
            )
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.process = process
        self.num_steps = num_steps
        self.clip_x0 = clip_x0
        self.timesteps = self._make_timesteps()  # (num_steps,) float32, descending

    @abstractmethod
    def _make_timesteps(self) -> Tensor: ...

    @abstractmethod
    def step(
        self, model_out: Tensor, t_index: int, x_t: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """One reverse step from timesteps[t_index] to the next timestep (to clean data after the last)."""

    def __len__(self) -> int:
        return self.num_steps

    def batch_timesteps(self, t_index: int, x_t: Tensor) -> Tensor:
        """timesteps[t_index] repeated per image (N,) on x_t's device, as the model takes it."""
        return self.timesteps[t_index].to(x_t.device).expand(x_t.shape[0])

    def predict_x0(self, x_t: Tensor, model_out: Tensor, t: Tensor) -> Tensor:
        x0 = self.process.predict_x0(x_t, model_out, t)
        return x0.clamp(-1, 1) if self.clip_x0 else x0

    def sample(
        self,
        model_fn: Callable[[Tensor, Tensor], Tensor],
        x_T: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Run the whole chain from pure noise x_T (N, C, H, W); model_fn(x_t, t (N,)) -> model output."""
        x = x_T
        for i in range(self.num_steps):
            x = self.step(model_fn(x, self.batch_timesteps(i, x)), i, x, generator)
        return x


class _RespacedSampler(Sampler):
    """Base for DDPM samplers on a strided subsequence of the T training steps.

    Evenly spaced integer steps from T-1 down to 0, as "Improved DDPM" respacing.
    The step from t to the next kept step t' uses beta = 1 - alpha_bar_t / alpha_bar_t',
    the beta that makes the shortened chain share the training marginals.
    """

    process_type = DDPM

    def __init__(self, process: DDPM, num_steps: int, clip_x0: bool = False) -> None:
        if num_steps > process.num_timesteps:
            raise ValueError(f"num_steps={num_steps} exceeds the process's {process.num_timesteps} timesteps")
        super().__init__(process, num_steps, clip_x0)
        ab = process.alpha_bar[self.timesteps.long()]  # (num_steps,) float64
        self.alpha_bar = ab
        self.alpha_bar_prev = torch.cat([ab[1:], ab.new_ones(1)])  # clean data after the last step

    def _make_timesteps(self) -> Tensor:
        return (
            torch.linspace(self.process.num_timesteps - 1, 0, self.num_steps, dtype=torch.float64)
            .round()
            .float()
        )

    @property
    def betas(self) -> Tensor:
        """Respaced betas (num_steps,) float64, aligned with timesteps."""
        return 1 - self.alpha_bar / self.alpha_bar_prev


class DDPMSampler(_RespacedSampler):
    """Ancestral sampling from the posterior q(x_t' | x_t, x0_hat) with its variance (the "fixed small" choice)."""

    def step(self, model_out, t_index, x_t, generator=None):
        ab, ab_prev = self.alpha_bar[t_index].item(), self.alpha_bar_prev[t_index].item()
        beta = 1 - ab / ab_prev
        x0 = self.predict_x0(x_t, model_out, self.batch_timesteps(t_index, x_t))
        x0_coef = math.sqrt(ab_prev) * beta / (1 - ab)
        xt_coef = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        mean = x0_coef * x0 + xt_coef * x_t  # (N, C, H, W)
        var = beta * (1 - ab_prev) / (1 - ab)
        if var <= 0:
            return mean
        return mean + math.sqrt(var) * _randn_like(x_t, generator)


class DDIMSampler(_RespacedSampler):
    """DDIM (Song et al. 2021): deterministic at eta = 0; eta = 1 matches DDPMSampler's distribution."""

    def __init__(self, process: DDPM, num_steps: int, clip_x0: bool = False, eta: float = 0.0) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        super().__init__(process, num_steps, clip_x0)
        self.eta = eta

    def step(self, model_out, t_index, x_t, generator=None):
        ab, ab_prev = self.alpha_bar[t_index].item(), self.alpha_bar_prev[t_index].item()
        t = self.batch_timesteps(t_index, x_t)
        x0 = self.predict_x0(x_t, model_out, t)
        eps = (
            self.process.eps_from_x0(x_t, x0, t)
            if self.clip_x0
            else self.process.predict_eps(x_t, model_out, t)
        )
        sigma = self.eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps  # (N, C, H, W)
        if sigma <= 0:
            return x_prev
        return x_prev + sigma * _randn_like(x_t, generator)


class EulerSampler(Sampler):
    """Euler steps of the flow ODE dx/ds = v from s = 1 (noise) to s = 0 (data) on a uniform grid.

    The first evaluation is at t = T (s = 1), the edge of the [0, T) training range.
    """

    process_type = RectifiedFlow

    def _make_timesteps(self) -> Tensor:
        return self.process.num_timesteps * self._levels()[:-1].float()

    def _levels(self) -> Tensor:
        """Noise levels s (num_steps + 1,) float64 from 1 to 0."""
        return torch.linspace(1, 0, self.num_steps + 1, dtype=torch.float64)

    def step(self, model_out, t_index, x_t, generator=None):
        s, s_next = self._levels()[t_index : t_index + 2].tolist()
        v = model_out
        if self.clip_x0:
            x0 = self.predict_x0(x_t, model_out, self.batch_timesteps(t_index, x_t))
            v = (x_t - x0) / s  # the velocity consistent with the clipped x0
        return x_t + (s_next - s) * v  # (N, C, H, W)


SAMPLERS: dict[str, type[Sampler]] = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "euler": EulerSampler}


def make_sampler(
    process: DiffusionProcess, name: str, num_steps: int, *, clip_x0: bool = False, **options
) -> Sampler:
    """Build sampler `name` for `process`; options go to the sampler class (e.g. eta for ddim)."""
    valid = sorted(n for n, cls in SAMPLERS.items() if isinstance(process, cls.process_type))
    if name not in valid:
        raise ValueError(f"unknown sampler {name!r} for the {process.name!r} process; valid choices: {valid}")
    return SAMPLERS[name](process, num_steps, clip_x0=clip_x0, **options)
