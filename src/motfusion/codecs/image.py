"""The image representation: how images look to the model, in one object per form.

`data.image_repr` picks one of three; everything else asks the object, never the config string:

    pixels   Pixels()        the model diffuses on the image itself, (3, H, W) in [-1, 1]
    latents  Latents(vae)    on a frozen VAE's latent grid, (C, H/d, W/d) (codecs/vae.py)
    tokens   Tokens(vq)      images are spans of VQ codes, sampled by the image head (codecs/vq.py):
                             the Chameleon setting

Each one owns its channels, its downsampling, `encode` / `decode` between pixels and the model's
image space, and `documents`, the data-side transform that puts documents' images into that space.
`image_repr(cfg)` builds the run's; `apply_image_repr(cfg)` fits the model config to it.
"""

from __future__ import annotations

from collections import defaultdict

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

    def wrap(self, x: torch.Tensor, context: bool) -> Segment:
        """One encoded image -> the segment a document holds for it."""
        return Image(x, context=context)

    def documents(self, docs: list[Document]) -> list[Document]:
        """Documents with each of their images in the model's space (a context image stays context).
        The images of all of them are encoded together, one batch per image size: a VAE or VQ-VAE
        run once per image costs ten times the batch (per-call overhead)."""
        out = [list(doc) for doc in docs]
        by_size: dict[tuple[int, ...], list[tuple[int, int]]] = defaultdict(list)
        for d, doc in enumerate(docs):
            for s, seg in enumerate(doc):
                if isinstance(seg, Image):
                    by_size[tuple(seg.pixels.shape)].append((d, s))
        for where in by_size.values():
            encoded = self.encode(torch.stack([docs[d][s].pixels for d, s in where])).cpu()
            for (d, s), x in zip(where, encoded):
                out[d][s] = self.wrap(x, docs[d][s].context)
        return out

    def to(self, device: torch.device | str) -> ImageRepr:
        return self


Pixels = ImageRepr


class Latents(ImageRepr):
    """A frozen VAE's latents: the posterior mean, so encoding is deterministic. Training streams
    encode their documents in fixed blocks (data/pipeline.py, DocumentStream), so a document gets the
    same latent whichever rank or resumed run asks for it."""

    name = "latents"

    def __init__(self, codec: LatentCodec):
        self.codec = codec
        self.channels, self.downsample = codec.latent_channels, codec.downsample

    @property
    def device(self) -> torch.device:
        return next(self.codec.parameters()).device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(pixels.to(self.device))  # (B, C, H/d, W/d)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(x.to(self.device))  # (B, 3, H, W)

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

    def wrap(self, x: torch.Tensor, context: bool) -> Segment:
        return Units("image", x)

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
