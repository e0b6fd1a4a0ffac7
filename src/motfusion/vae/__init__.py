"""Image autoencoders: motfusion's small KL-VAE, Stable Diffusion's VAE format, latents as images.

Training lives in motfusion.vae.train_vae (`motfusion train-vae`), imported on demand.
"""

from motfusion.vae.diffusers_format import (
    AutoencoderKL,
    AutoencoderKLConfig,
    load_diffusers_vae,
    save_diffusers_vae,
)
from motfusion.vae.kl_vae import (
    LatentCodec,
    LatentImages,
    VAEConfig,
    apply_image_repr,
    build_vae,
    cached_vae,
    image_codec,
    load_trained_vae,
    load_vae,
    save_vae,
)

__all__ = [
    "AutoencoderKL", "AutoencoderKLConfig", "LatentCodec", "LatentImages", "VAEConfig", "apply_image_repr",
    "build_vae", "cached_vae", "image_codec", "load_diffusers_vae", "load_trained_vae", "load_vae",
    "save_diffusers_vae", "save_vae",
]
