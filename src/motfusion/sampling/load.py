"""A checkpoint (or an exported file, or a save_pretrained directory) -> a ready Generator: the one
place that assembles it."""

from __future__ import annotations

from pathlib import Path

import torch

from motfusion.codecs.image import image_repr
from motfusion.config import Config
from motfusion.sampling.generate import Generator, SampleConfig
from motfusion.training.checkpoint import load_model

# Codecs a saved model directory carries with it (MotFusion.save_pretrained), used instead of the
# paths its config was trained with.
BUNDLED_VAE, BUNDLED_VQ, BUNDLED_SPEECH = "vae", "vq", "speech"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bundled_codecs(cfg: Config, directory: Path) -> Config:
    """Point the config at the codecs `directory` carries, where it carries them."""
    if cfg.data.image_repr == "latents" and (directory / BUNDLED_VAE).is_dir():
        cfg.model.vae = str(directory / BUNDLED_VAE)
    if cfg.data.image_repr == "tokens" and (directory / BUNDLED_VQ).is_dir():
        cfg.model.vq = str(directory / BUNDLED_VQ)
    if cfg.data.dataset.startswith("speech:") and (directory / BUNDLED_SPEECH).is_dir():
        cfg.data.dataset = f"speech:{directory / BUNDLED_SPEECH}"
    return cfg


def load_generator(
    path: Path | str, device: torch.device | str = "cpu", sample: SampleConfig | None = None, ema: bool = True
) -> tuple[Generator, Config]:
    """The model of `path` (a run, a checkpoint or an exported file: load_model; `ema`: its moving
    average where it has one), its tokenizer and its image representation, on `device`; and its config."""
    path = Path(path)
    model, cfg, tok = load_model(path, device, ema=ema)
    cfg = bundled_codecs(cfg, path if path.is_dir() else path.parent)
    return Generator(
        model, tok, cfg.objective, cfg.data.image_size, sample, image=image_repr(cfg, device)
    ), cfg
