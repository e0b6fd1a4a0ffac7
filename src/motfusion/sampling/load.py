"""A checkpoint (or an exported file) -> a ready Generator: the one place that assembles it."""

from __future__ import annotations

from pathlib import Path

import torch

from motfusion.codecs.image import image_repr
from motfusion.config import Config
from motfusion.sampling.generate import Generator, SampleConfig
from motfusion.training.checkpoint import load_model


def load_generator(path: Path | str, device: torch.device | str = "cpu", sample: SampleConfig | None = None,
                   ema: bool = True) -> tuple[Generator, Config]:
    """The model of `path` (a run, a checkpoint or an exported file: load_model; `ema`: its moving
    average where it has one), its tokenizer and its image representation, on `device`; and its config."""
    model, cfg, tok = load_model(Path(path), device, ema=ema)
    return Generator(model, tok, cfg.objective, cfg.data.image_size, sample, image=image_repr(cfg, device)), cfg
