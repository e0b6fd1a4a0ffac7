"""Forward noising processes: cosine-schedule DDPM and rectified flow.

Both are Gaussian paths x_t = a(t) x0 + b(t) eps over images (N, C, H, W) with
one float timestep per image on a shared 0..T scale, so a single timestep
embedding serves either process.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


def cosine_alpha_bar(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """alpha_bar_t for t = 0..T-1 under the cosine schedule (Nichol & Dhariwal 2021), float64 (T,).

    Built as a product of clipped betas rather than read off the cosine directly,
    so the last step keeps alpha_bar > 0 and x0 stays recoverable from x_{T-1}.
    """
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # (T+1,)
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)  # (T,)
    return torch.cumprod(1 - betas, dim=0)


def expand_as_image(v: Tensor, x: Tensor) -> Tensor:
    """Per-image values (N,) -> (N, 1, 1, 1) in x's dtype and device, to broadcast over (C, H, W)."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _uniform(n: int, generator: torch.Generator | None, device: torch.device | str | None) -> Tensor:
    """U[0, 1) draws (n,) in float64, made on the generator's own device so a CPU generator can seed GPU work."""
    source = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=source, dtype=torch.float64).to(device)


def _caps(max_t: Tensor | float | None, limit: float, n: int, device: torch.device | str | None) -> Tensor:
    """Per-sample upper bounds (n,) float64: max_t (scalar or (n,)) clamped to limit, or limit when None."""
    if max_t is None:
        return torch.full((n,), float(limit), dtype=torch.float64, device=device)
    cap = torch.as_tensor(max_t, dtype=torch.float64, device=device).expand(n)
    if (cap < 0).any():
        raise ValueError("max_t must be >= 0")
    return cap.clamp(max=limit)


class DiffusionProcess(ABC):
    """A forward process x_t = a(t) x0 + b(t) eps and the parametrisation the model predicts.

    Timesteps are float tensors (N,) in [0, T); everything broadcasts over (C, H, W).
    """

    name: str

    def __init__(self, num_timesteps: int = 1000) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps

    @abstractmethod
    def sample_timesteps(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        max_t: Tensor | float | None = None,
    ) -> Tensor:
        """Training timesteps (n,) float32 in [0, T), each at most its max_t (scalar or (n,))."""

    @abstractmethod
    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b), each float64 (N,), with x_t = a x0 + b eps."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model is trained to output at (x_t, t)."""

    @abstractmethod
    def predict_x0(self, x_t: Tensor, model_out: Tensor, t: Tensor) -> Tensor:
        """Clean-image estimate implied by the model output."""

    @abstractmethod
    def predict_eps(self, x_t: Tensor, model_out: Tensor, t: Tensor) -> Tensor:
        """Noise estimate implied by the model output."""

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, b = self.coefficients(t)
        return expand_as_image(a, x0) * x0 + expand_as_image(b, x0) * noise  # (N, C, H, W)

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """The noise consistent with x_t and a given x0 (e.g. a clipped one); needs b(t) > 0."""
        a, b = self.coefficients(t)
        return (x_t - expand_as_image(a, x_t) * x0) / expand_as_image(b, x_t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_timesteps={self.num_timesteps})"


class DDPM(DiffusionProcess):
    """Epsilon-prediction DDPM with the cosine schedule; timesteps are integer-valued floats."""

    name = "ddpm"

    def __init__(self, num_timesteps: int = 1000) -> None:
        super().__init__(num_timesteps)
        self.alpha_bar = cosine_alpha_bar(num_timesteps)  # (T,) float64

    def sample_timesteps(self, n, generator=None, device=None, max_t=None):
        upper = _caps(max_t, self.num_timesteps - 1, n, device).floor()  # (n,)
        t = (_uniform(n, generator, device) * (upper + 1)).floor()  # uniform in {0..upper}
        return t.float()

    def coefficients(self, t):
        ab = self.alpha_bar.to(t.device)[t.round().long()]  # (N,)
        return ab.sqrt(), (1 - ab).sqrt()

    def target(self, x0, noise, t):
        return noise

    def predict_x0(self, x_t, model_out, t):
        a, b = self.coefficients(t)
        return (x_t - expand_as_image(b, x_t) * model_out) / expand_as_image(a, x_t)

    def predict_eps(self, x_t, model_out, t):
        return model_out


class RectifiedFlow(DiffusionProcess):
    """x_t = (1 - s) x0 + s eps with s = t / T; the model predicts the velocity v = eps - x0.

    Training noise levels are uniform, or logit-normal (SD3, Esser et al. 2024): s = sigmoid(u),
    u ~ N(0, 1), which spends more of the training on the middle noise levels, where the layout and
    colors of an image are decided, and less near 0 and 1 where the velocity is easy to predict.
    `shift` > 1 then moves every draw toward noise, s -> shift s / (1 + (shift - 1) s) (SD3's
    timestep shift; the median of uniform draws becomes shift / (1 + shift)): more of the training
    at the high noise levels where a sample's layout, and which color goes to which object, form."""

    name = "flow"
    TIMESTEPS = ("uniform", "logit_normal")

    def __init__(self, num_timesteps: int = 1000, timesteps: str = "uniform", shift: float = 1.0) -> None:
        super().__init__(num_timesteps)
        if timesteps not in self.TIMESTEPS:
            raise ValueError(
                f"unknown flow timestep distribution {timesteps!r}; choose from {self.TIMESTEPS}"
            )
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"the flow timestep shift must be a positive number, got {shift}")
        self.timesteps, self.shift = timesteps, shift

    def sample_timesteps(self, n, generator=None, device=None, max_t=None):
        upper = _caps(max_t, self.num_timesteps, n, device)  # (n,)
        if self.timesteps == "uniform":
            s = _uniform(n, generator, device)  # uniform in [0, 1)
        else:
            source = generator.device if generator is not None else device
            s = torch.randn(n, generator=generator, device=source, dtype=torch.float64).to(device).sigmoid()
        s = self.shift * s / (1 + (self.shift - 1) * s)  # still in [0, 1); exactly s at shift 1
        return (s * upper).float()  # in [0, upper)

    def noise_level(self, t: Tensor) -> Tensor:
        """s = t / T in [0, 1], float64 (N,)."""
        return t.double() / self.num_timesteps

    def coefficients(self, t):
        s = self.noise_level(t)
        return 1 - s, s

    def target(self, x0, noise, t):
        return noise - x0

    def predict_x0(self, x_t, model_out, t):
        return x_t - expand_as_image(self.noise_level(t), x_t) * model_out

    def predict_eps(self, x_t, model_out, t):
        return x_t + expand_as_image(1 - self.noise_level(t), x_t) * model_out


PROCESSES: dict[str, type[DiffusionProcess]] = {"ddpm": DDPM, "flow": RectifiedFlow}


def make_process(
    name: str, num_timesteps: int = 1000, timesteps: str = "uniform", shift: float = 1.0
) -> DiffusionProcess:
    """`timesteps` and `shift`: the training noise-level distribution of flow (uniform or
    logit_normal, then shifted toward noise by `shift`)."""
    if name not in PROCESSES:
        raise ValueError(f"unknown diffusion process {name!r}; valid choices: {sorted(PROCESSES)}")
    if name == "flow":
        return RectifiedFlow(num_timesteps, timesteps, shift)
    return PROCESSES[name](num_timesteps)
