"""train.compile=true on CPU: compiled blocks train like eager ones (losses and gradients).

Dynamo's graph capture and AOT autograd are what can go wrong with the blocks' inputs (routes,
document buckets, custom autograd functions, shapes that change per batch); the test compiles with
the aot_eager backend so that it takes seconds, not the minutes of inductor's C++ code generation.
benchmarks/bench.py runs the real thing (inductor) and records its losses against eager.
"""

import functools

import torch
from conftest import random_batch

from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.recipes import get_recipe
from motfusion.training.distributed import World
from motfusion.training.parallelize import parallelize
from motfusion.training.trainer import build_optimizer, train_step


def test_compiled_training_equals_eager(tok, monkeypatch):
    """Two steps on batches of different shapes (a recompile); the update makes step 2's loss
    depend on step 1's gradients, so equal losses mean equal gradients too."""
    cfg = get_recipe("debug").override(["model.dim=32", "model.n_layers=1", "model.n_heads=2"])
    batches = [random_batch(tok, seed=s, rows=2, seq_len=96) for s in range(2)]
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    losses = {}
    for compiled in (False, True):
        cfg.train.compile = compiled
        torch.manual_seed(0)
        model = parallelize(TransfusionModel(cfg.model, tok.vocab_size), cfg.train, World())
        objective, optimizer = TransfusionObjective(cfg.objective), build_optimizer(model, cfg.train)
        generator = torch.Generator().manual_seed(0)
        losses[compiled] = [
            train_step(model, objective, optimizer, b, generator, 1e-3, 1.0)["loss"] for b in batches
        ]
    torch.testing.assert_close(losses[True], losses[False], atol=1e-5, rtol=1e-5)
