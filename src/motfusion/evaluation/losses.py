"""Validation losses: the objective's per-modality breakdown on held-out packed batches of the run's
own data (`val_loss/text`, `val_loss/image`, ...)."""

from __future__ import annotations

import torch

from motfusion.config import Config
from motfusion.data.pipeline import make_packer
from motfusion.errors import ConfigError
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.tokenizer import Tokenizer


@torch.no_grad()
def validation_losses(
    model: TransfusionModel, cfg: Config, tokenizer: Tokenizer, n_batches: int = 8, seed: int = 0
) -> dict[str, float]:
    """The objective's loss per modality, averaged over the first `n_batches` val batches.

    The val documents and the diffusion noise are fixed (val split seed, `seed`), so two checkpoints
    of a run are scored on exactly the same batches."""
    if n_batches < 1:
        raise ConfigError(
            f"the validation loss needs at least one val batch (--val-batches), got {n_batches}"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    packer = make_packer(cfg, tokenizer, "val")
    objective = TransfusionObjective(cfg.objective)
    g = torch.Generator(device=device).manual_seed(seed)
    totals = {}
    for _ in range(n_batches):
        loss, parts = objective(model, packer.next_batch().to(device), g)
        for key, value in {"loss": loss, **parts}.items():
            totals[f"val_{key}"] = totals.get(f"val_{key}", 0.0) + float(value) / n_batches
    model.train(was_training)
    return totals
