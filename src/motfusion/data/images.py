"""Pictures <-> the library's image tensors, (3, H, W) float in [-1, 1]: the one place that maps
0..255 to [-1, 1] and back, and that brings every pixel format Pillow decodes to 8-bit RGB."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image as PILImage


def from_uint8(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 values of any shape -> float32 in [-1, 1], same shape."""
    return torch.as_tensor(np.asarray(values)).float() / 127.5 - 1


def to_rgb(pic: PILImage.Image) -> PILImage.Image:
    """Any decoded picture -> 8-bit RGB, or ValueError saying why its pixels have no meaning as colours.

    Pillow's convert("RGB") clips: a 16-bit ramp (mode I;16) becomes almost all white and float pixels
    (mode F) all black or all white. Here 16-bit values are scaled by 65535; 32-bit integers (mode I)
    are read as 16-bit when they fit 0..65535 (Pillow's container for 16-bit data) and refused
    otherwise; float pixels must lie in [0, 1]."""
    mode = pic.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(pic).astype(np.float64)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"32-bit integer pixels (mode I) span {values.min():.0f}..{values.max():.0f}, which has "
                "no known scale; save the image with 8 or 16 bits per channel"
            )
        values = values / 65535
    elif mode == "F":
        values = np.asarray(pic).astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError("float pixels (mode F) must be numbers in [0, 1]; some are inf or nan")
        if values.size and (values.min() < 0 or values.max() > 1):
            raise ValueError(
                f"float pixels (mode F) must lie in [0, 1]; these span {values.min():.4g}.."
                f"{values.max():.4g}; save the image with 8 or 16 bits per channel"
            )
    else:
        try:
            return pic.convert("RGB")
        except ValueError as e:  # e.g. LAB, which Pillow cannot convert
            raise ValueError(f"pixels of mode {mode} cannot be converted to RGB ({e})") from None
    return PILImage.fromarray(np.round(values * 255).astype(np.uint8), "L").convert("RGB")


def from_pil(pic: PILImage.Image) -> torch.Tensor:
    """A picture -> (3, H, W) in [-1, 1]."""
    return from_uint8(np.asarray(to_rgb(pic)).copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def to_pil(image: torch.Tensor, scale: int = 4) -> PILImage.Image:
    """(3, H, W) in [-1, 1] -> an upscaled RGB picture (nearest neighbour keeps pixels crisp)."""
    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    pic = PILImage.fromarray(arr, "RGB")
    return pic.resize((pic.width * scale, pic.height * scale), PILImage.NEAREST)
