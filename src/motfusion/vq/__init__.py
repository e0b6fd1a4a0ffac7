"""The VQ-VAE image tokenizer of the Chameleon setting (`data.image_repr=tokens`, `model.vq=DIR`).

Images become spans of discrete codes between BOI and EOI, trained with the LM loss of their own
head and sampled autoregressively; the VQ decoder turns sampled codes back into pixels.
"""

from __future__ import annotations

import torch

from motfusion.config import ModelConfig
from motfusion.errors import ConfigError
from motfusion.sequence import Document, Image, Units
from motfusion.vq.train import VQTrainConfig, evaluate_vq, load_vq, save_vq, train_vq
from motfusion.vq.vqvae import VQVAE, VQConfig, perplexity, psnr

__all__ = ["ImageTokens", "VQConfig", "VQTrainConfig", "VQVAE", "evaluate_vq", "load_image_tokenizer", "load_vq",
           "perplexity", "psnr", "save_vq", "train_vq"]


def load_image_tokenizer(model_cfg: ModelConfig, image_size: int, device: torch.device | str = "cpu") -> VQVAE:
    """The VQ-VAE in `model.vq`, checked against the model's image vocabulary and the image size."""
    vq = load_vq(model_cfg.vq, device)
    vocab = model_cfg.vocab_sizes.get("image")
    if vocab != vq.vocab_size:
        raise ConfigError(f"model.vocab_sizes has image:{vocab} but the VQ-VAE in {model_cfg.vq} has "
                          f"{vq.vocab_size} codes: set model.vocab_sizes=image:{vq.vocab_size}")
    if image_size % vq.cfg.downsample:
        raise ConfigError(f"data.image_size={image_size} must be divisible by the VQ-VAE's downsampling "
                          f"factor {vq.cfg.downsample} ({model_cfg.vq})")
    return vq


class ImageTokens:
    """Document -> the same document with every image replaced by its codes, Units("image", codes)."""

    def __init__(self, vq: VQVAE):
        self.vq = vq

    def __call__(self, doc: Document) -> Document:
        return [Units("image", self.vq.encode(seg.pixels[None])[0]) if isinstance(seg, Image) else seg for seg in doc]
