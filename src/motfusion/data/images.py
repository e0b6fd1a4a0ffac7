"""Pictures <-> the library's image tensors, (3, H, W) float in [-1, 1]: the one place that maps
0..255 to [-1, 1] and back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from motfusion.errors import ConfigError


def from_uint8(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 values of any shape -> float32 in [-1, 1], same shape."""
    return torch.as_tensor(np.asarray(values)).float() / 127.5 - 1


def from_pil(pic: PILImage.Image) -> torch.Tensor:
    """A picture -> (3, H, W) in [-1, 1]."""
    return from_uint8(np.asarray(pic.convert("RGB")).copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def to_pil(image: torch.Tensor, scale: int = 4) -> PILImage.Image:
    """(3, H, W) in [-1, 1] -> an upscaled RGB picture (nearest neighbour keeps pixels crisp)."""
    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    pic = PILImage.fromarray(arr, "RGB")
    return pic.resize((pic.width * scale, pic.height * scale), PILImage.NEAREST)


def read_image(path: Path, size: int) -> torch.Tensor:
    """A picture file -> (3, size, size) in [-1, 1] (resized when it has another size)."""
    try:
        pic = PILImage.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"cannot read image {path}: {e}") from None
    if pic.size != (size, size):
        pic = pic.resize((size, size), PILImage.BICUBIC)
    return from_pil(pic)
