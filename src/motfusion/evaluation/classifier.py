"""A small CNN trained here on Fashion-MNIST: the feature extractor behind `fid_fashion_classifier`
and the judge behind `class_accuracy`.

It is not Inception: its Fréchet distances are comparable only with each other (same classifier
weights, same image size), never with published FIDs. `motfusion train-classifier --out DIR`
trains it reproducibly (seeded init, seeded batch order) and writes the artifact DIR
(artifacts.py, kind "classifier": weights.safetensors; config.json with its config, test accuracy
and class names).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from motfusion.artifacts import WEIGHTS, load_artifact, save_artifact
from motfusion.config import TrackingConfig, dataclass_from_dict
from motfusion.data.fashion import CLASSES, FASHION_DIR, load_fashion
from motfusion.data.images import from_uint8
from motfusion.errors import ConfigError
from motfusion.training.logging import Tracker
from motfusion.training.loop import LoopConfig, train_loop


@dataclass(kw_only=True)
class ClassifierConfig(TrackingConfig):  # and where its training logs
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 16  # channels of the first two convolutions; the last two have twice as many
    feature_dim: int = 128  # the penultimate layer, whose activations FID compares
    input_size: int = 28  # images of any size are resized to this
    seed: int = 0

    def validate(self) -> ClassifierConfig:
        if (
            min(self.steps, self.batch_size, self.width, self.feature_dim, self.input_size) <= 0
            or self.lr <= 0
        ):
            raise ConfigError(
                "classifier steps, batch_size, width, feature_dim, input_size and lr must be positive"
            )
        self.check_tracking()
        return self


class FashionClassifier(nn.Module):
    """Four 3x3 convolutions in two stages, average pooled to 4x4, then a feature layer and a linear head."""

    def __init__(self, cfg: ClassifierConfig, num_classes: int = len(CLASSES)):
        super().__init__()
        w, self.input_size = cfg.width, cfg.input_size
        conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1)
        self.body = nn.Sequential(
            conv(3, w),
            nn.ReLU(),
            conv(w, w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            conv(w, 2 * w),
            nn.ReLU(),
            conv(2 * w, 2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.feature = nn.Sequential(nn.Linear(2 * w * 16, cfg.feature_dim), nn.ReLU())
        self.head = nn.Linear(cfg.feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, feature_dim) penultimate activations."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False
            )
        return self.feature(self.body(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, num_classes)


def as_images(gray: torch.Tensor) -> torch.Tensor:
    """(B, h, w) uint8 -> (B, 3, h, w) float in [-1, 1]."""
    return from_uint8(gray)[:, None].expand(-1, 3, -1, -1)


@torch.no_grad()
def batched(
    fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 500
) -> torch.Tensor:
    """fn over images in chunks (images may be uint8 (N, h, w) grayscale or (N, 3, H, W) floats)."""
    outs = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        outs.append(fn(as_images(chunk) if chunk.dtype == torch.uint8 else chunk))
    return torch.cat(outs)


def accuracy(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images put in their class (the model has no mode-dependent layers)."""
    return float((batched(model, images).argmax(-1) == labels).float().mean())


def train_classifier(
    cfg: ClassifierConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    log: Callable[[str], None] | None = None,
    log_every: int = 100,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> tuple[FashionClassifier, list[float]]:
    """Train on (N, h, w) uint8 images and (N,) labels; returns the model (eval mode) and per-step losses.
    `log` and `on_log` are train_loop's.

    AdamW with a cosine learning rate, reshuffled epochs and random horizontal flips, all drawn
    from generators seeded by `cfg.seed`, so a run is reproducible.
    """
    cfg.validate()
    torch.manual_seed(cfg.seed)
    model = FashionClassifier(cfg).train()
    g = torch.Generator().manual_seed(cfg.seed)
    order, cursor = torch.randperm(len(images), generator=g), 0

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        nonlocal order, cursor
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=g), 0
        idx = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        x = as_images(images[idx])  # (B, 3, h, w)
        flip = torch.rand(len(idx), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return F.cross_entropy(model(x), labels[idx]), {}

    loop = LoopConfig(
        name="classifier", steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, log_every=log_every
    )
    history = train_loop(model.parameters(), step_loss, loop, log, on_log)
    return model.eval(), [r["loss"] for r in history]


def fit_fashion_classifier(
    cfg: ClassifierConfig,
    out: Path,
    root: Path = FASHION_DIR,
    log: Callable[[str], None] = functools.partial(print, flush=True),
) -> dict[str, float]:
    """Train on the 60k train images, score on the 10k test images, save to `out`; returns the metrics."""
    train_x, train_y = (torch.from_numpy(a) for a in load_fashion(Path(root), "train"))
    test_x, test_y = (torch.from_numpy(a) for a in load_fashion(Path(root), "val"))
    t0 = time.perf_counter()
    with Tracker(out, tracking=cfg, config=asdict(cfg)) as tracker:  # out/metrics.jsonl, TensorBoard, W&B
        model, losses = train_classifier(cfg, train_x, train_y, log=log, on_log=tracker.log)
    metrics = {
        "test_accuracy": accuracy(model, test_x, test_y),
        "final_train_loss": float(np.mean(losses[-100:])),
        "train_seconds": time.perf_counter() - t0,
    }
    save_classifier(model, cfg, metrics, out)
    log(f"test accuracy {metrics['test_accuracy']:.4f} on {len(test_y)} images; wrote {Path(out) / WEIGHTS}")
    return metrics


def save_classifier(
    model: FashionClassifier, cfg: ClassifierConfig, metrics: dict[str, float], out: Path
) -> None:
    save_artifact(
        out, "classifier", model.state_dict(), asdict(cfg), {"metrics": metrics, "classes": list(CLASSES)}
    )


def load_classifier(path: Path) -> FashionClassifier:
    """The classifier saved in directory `path` (or an older classifier.safetensors + classifier.json), in eval mode."""
    artifact = load_artifact(path, "classifier", f"train one with `motfusion train-classifier --out {path}`")
    model = FashionClassifier(dataclass_from_dict(ClassifierConfig, artifact.config))
    model.load_state_dict(artifact.tensors)
    return model.eval()
