"""The image representation: how images look to the model, in one object per form.

`data.image_repr` picks one of three; everything else asks the object, never the config string:

    pixels   Pixels()        the model diffuses on the image itself, (3, H, W) in [-1, 1]
    latents  Latents(vae)    on a frozen VAE's latent grid, (C, H/d, W/d) (codecs/vae.py)
    tokens   Tokens(vq)      images are spans of VQ codes, sampled by the image head (codecs/vq.py):
                             the Chameleon setting

Each one owns its channels, its downsampling, `encode` / `decode` between pixels and the model's
image space, and `document`, the data-side transform that puts a document's images into that space.
`image_repr(cfg)` builds the run's; `apply_image_repr(cfg)` fits the model config to it.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from motfusion.codecs.vae import LatentCodec, cached_vae
from motfusion.codecs.vq import VQVAE, load_image_tokenizer
from motfusion.config import Config
from motfusion.errors import ConfigError
from motfusion.sequence import Document, Image, Segment, Units


class ImageRepr:
    """Pixels: the identity. The base of the other two."""

    name, discrete = "pixels", False
    channels, downsample = 3, 1  # of the model's image space; pixels per position along a side

    def side(self, image_size: int) -> int:
        """The model-space grid side of an `image_size` x `image_size` image."""
        return image_size // self.downsample

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> the model's image space."""
        return pixels

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The model's image space -> pixels (B, 3, H, W) in [-1, 1], for whatever leaves the library."""
        return x

    def segment(self, pixels: torch.Tensor) -> Segment:
        """One image (3, H, W) -> the segment a document holds for it."""
        return Image(self.encode(pixels[None])[0])

    def document(self, doc: Document) -> Document:
        """A document with each of its images in the model's space (a context image stays context)."""
        return [self._convert(seg) if isinstance(seg, Image) else seg for seg in doc]

    def _convert(self, image: Image) -> Segment:
        seg = self.segment(image.pixels)
        return dataclasses.replace(seg, context=image.context) if isinstance(seg, Image) else seg

    def to(self, device: torch.device | str) -> ImageRepr:
        return self


Pixels = ImageRepr


class Latents(ImageRepr):
    """A frozen VAE's latents. Each distinct image is encoded once and kept, keyed by its pixels: a
    finite dataset is encoded during its first epoch only, and an image gets the same latent whichever
    document, rank or resumed run asks for it (encoding is deterministic: caching changes no result)."""

    name = "latents"

    def __init__(self, codec: LatentCodec):
        self.codec = codec
        self.channels, self.downsample = codec.latent_channels, codec.downsample
        self.cache: dict[bytes, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.codec.parameters()).device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(pixels.to(self.device))  # (B, C, H/d, W/d)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(x.to(self.device))  # (B, 3, H, W)

    def segment(self, pixels: torch.Tensor) -> Segment:
        digest = hashlib.blake2b(repr(tuple(pixels.shape)).encode(), digest_size=16)
        digest.update(pixels.detach().cpu().float().contiguous().numpy().tobytes())
        key = digest.digest()
        if key not in self.cache:
            self.cache[key] = self.encode(pixels[None])[0].cpu()
        return Image(self.cache[key])

    def to(self, device: torch.device | str) -> Latents:
        self.codec.to(device)
        return self


class Tokens(ImageRepr):
    """VQ codes: an image is a span of (H/d)^2 discrete codes, decoded back by the VQ-VAE."""

    name, discrete = "tokens", True

    def __init__(self, vq: VQVAE):
        self.vq = vq
        self.channels, self.downsample = 3, vq.cfg.downsample

    @property
    def device(self) -> torch.device:
        return next(self.vq.parameters()).device

    def tokens_per_image(self, image_size: int) -> int:
        return self.side(image_size) ** 2

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(pixels.to(self.device))  # (B, L) codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vq.decode(codes.to(self.device))  # (B, 3, H, W)

    def segment(self, pixels: torch.Tensor) -> Segment:
        return Units("image", self.encode(pixels[None])[0].cpu())

    def to(self, device: torch.device | str) -> Tokens:
        self.vq.to(device)
        return self


def image_repr(cfg: Config, device: torch.device | str = "cpu") -> ImageRepr:
    """The run's image representation (data.image_repr), its VAE or VQ-VAE loaded onto `device`."""
    if cfg.data.image_repr == "latents":
        return Latents(cached_vae(cfg.model.vae, device))
    if cfg.data.image_repr == "tokens":
        return Tokens(load_image_tokenizer(cfg.model, cfg.data.image_size, device))
    return Pixels()


def apply_image_repr(cfg: Config) -> Config:
    """Fit the model config to its images: model.image_channels becomes the representation's channels
    (a VAE's latent channels), and the model-space grid must split into patches. Returns `cfg`."""
    if cfg.data.image_repr != "latents":  # pixels keep the configured channels; VQ codes have none
        return cfg
    rep, side, k = image_repr(cfg), cfg.data.image_size, cfg.model.patch_size
    d = rep.downsample
    if side % d:
        raise ConfigError(
            f"data.image_size={side} must be divisible by the VAE's downsampling factor {d} ({cfg.model.vae})"
        )
    if (side // d) % k:
        raise ConfigError(
            f"the latent grid {side // d}x{side // d} (data.image_size={side} / {d}) "
            f"must be divisible by model.patch_size={k}"
        )
    cfg.model.image_channels = rep.channels
    return cfg
