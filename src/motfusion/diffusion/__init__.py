"""Diffusion processes (DDPM, rectified flow) and their samplers for image tokens."""

from motfusion.diffusion.samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    EulerSampler,
    Sampler,
    cfg,
    make_sampler,
)
from motfusion.diffusion.schedules import (
    DDPM,
    PROCESSES,
    DiffusionProcess,
    RectifiedFlow,
    cosine_alpha_bar,
    make_process,
)

__all__ = [
    "DDPM",
    "PROCESSES",
    "SAMPLERS",
    "DDIMSampler",
    "DDPMSampler",
    "DiffusionProcess",
    "EulerSampler",
    "RectifiedFlow",
    "Sampler",
    "cfg",
    "cosine_alpha_bar",
    "make_process",
    "make_sampler",
]
