"""The Transfusion objective: L = L_LM + lambda * L_diffusion, with a breakdown per modality.

It lives outside the model (as in DiT): it draws one noise level per image, noises the clean images,
runs the model once over the whole packed batch, and scores both outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from motfusion.config import ObjectiveConfig
from motfusion.diffusion import make_process
from motfusion.models.transfusion import TransfusionModel
from motfusion.sequence import Batch


class TransfusionObjective:
    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.process = make_process(cfg.diffusion, cfg.num_timesteps)

    def max_timesteps(self, image_first: torch.Tensor) -> torch.Tensor:
        """(N,) noise cap per image: images that precede their caption are capped (Transfusion 4.2)."""
        T = float(self.cfg.num_timesteps)
        cap = T if self.cfg.image_first_noise_cap is None else float(self.cfg.image_first_noise_cap)
        return torch.where(image_first, cap, T)

    def __call__(self, model: TransfusionModel, batch: Batch,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the total loss and a breakdown {"loss/text", "loss/image"} (detached)."""
        x0 = batch.images  # (N, C, H, W)
        N = x0.shape[0]
        t = self.process.sample_timesteps(N, generator, x0.device, max_t=self.max_timesteps(batch.image_first))
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.process.add_noise(x0, noise, t)
        out = model(batch, x_t, t)

        zero = out.hidden.sum() * 0  # keeps the graph connected when a modality is absent
        idx = batch.text_loss_index
        if idx.numel():
            hidden = out.hidden.flatten(0, 1)[idx]  # (n_text, D)
            text_loss = F.cross_entropy(model.text_logits(hidden).float(), batch.targets.flatten()[idx])
        else:
            text_loss = zero
        if N:
            target = self.process.target(x0, noise, t)
            image_loss = (out.image.float() - target).pow(2).mean(dim=(1, 2, 3)).mean()  # per image, then over images
        else:
            image_loss = zero
        loss = text_loss + self.cfg.image_loss_weight * image_loss
        return loss, {"loss/text": text_loss.detach(), "loss/image": image_loss.detach()}
