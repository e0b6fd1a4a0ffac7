"""Fitting the speech unit codec (`motfusion train-speech-tokenizer`): k-means (k-means++ start,
Lloyd iterations) on the standardized log-mel frames of a speech dataset, then the dataset's units
cached beside it. The codec itself is codecs/speech.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from motfusion.codecs.audio import LogMel, read_wav
from motfusion.codecs.speech import (
    DEFAULT_SUBDIR,
    UNITS_FILE,
    SpeechTokenizer,
    SpeechTokenizerConfig,
    nearest,
    save_units,
)
from motfusion.data.speech import read_speech_data
from motfusion.errors import ConfigError, DataError


def kmeans_pp_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ (Arthur and Vassilvitskii, 2007): each new center is drawn with probability
    proportional to the squared distance to the nearest center chosen so far. (N, D) -> (k, D)."""
    N = x.shape[0]
    x_sq = x.pow(2).sum(1)  # (N,)
    chosen = [int(torch.randint(N, (1,), generator=generator))]
    d2 = torch.full((N,), float("inf"))
    for _ in range(k):
        c = x[chosen[-1]]
        d2 = torch.minimum(d2, (x_sq - 2 * (x @ c) + c.pow(2).sum()).clamp(min=0))  # (N,)
        if len(chosen) == k:
            break
        cdf = d2.double().cumsum(0)  # (N,) sampling by inverse CDF: one pass, no normalization
        u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
        chosen.append(min(int(torch.searchsorted(cdf, u)), N - 1))
    return x[chosen].clone()


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (K, D)
    inertia: list[float]  # mean squared distance to the nearest centroid, after init and each iteration


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0, tol: float = 1e-5) -> KMeansResult:
    """Lloyd's algorithm from a k-means++ start; an emptied cluster is re-seeded at the worst-fit point."""
    if x.shape[0] < k:
        raise ConfigError(f"k-means needs at least k={k} points, got {x.shape[0]}; lower --k or add data")
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    centroids = kmeans_pp_init(x, k, g)
    assign, dist = nearest(x, centroids)
    inertia = [float(dist.mean())]
    with tqdm(total=iters, desc="k-means", unit="iter", disable=None) as bar:  # stderr, on a terminal only
        for _ in range(iters):
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # (K, D)
            counts = torch.bincount(assign, minlength=k)  # (K,)
            centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
            for empty in (counts == 0).nonzero().flatten().tolist():
                worst = int(dist.argmax())
                centroids[empty], dist[worst] = x[worst], 0.0
            assign, dist = nearest(x, centroids)
            inertia.append(float(dist.mean()))
            bar.set_postfix(inertia=f"{inertia[-1]:.4g}", refresh=False)
            bar.update(1)
            if inertia[-2] - inertia[-1] <= tol * inertia[-2]:
                break
    return KMeansResult(centroids, inertia)


def fit_tokenizer(frames: torch.Tensor, cfg: SpeechTokenizerConfig) -> tuple[SpeechTokenizer, KMeansResult]:
    """frames: (N, n_mels) log-mel frames -> a tokenizer whose centroids are k-means of the
    standardized frames (a random subset of at most `cfg.max_frames`, drawn with `cfg.seed`)."""
    g = torch.Generator().manual_seed(cfg.seed)
    if frames.shape[0] > cfg.max_frames:
        frames = frames[torch.randperm(frames.shape[0], generator=g)[: cfg.max_frames]]
    mean, std = frames.mean(0), frames.std(0).clamp(min=1e-3)  # (n_mels,) each
    result = kmeans((frames - mean) / std, cfg.k, cfg.iters, cfg.seed)
    return SpeechTokenizer(cfg, result.centroids, mean, std), result


def train_speech_tokenizer(
    data_dir: str | Path,
    out_dir: str | Path | None,
    cfg: SpeechTokenizerConfig,
    log: Callable[[str], None] = partial(print, flush=True),
) -> SpeechTokenizer:
    """Fit k-means on the log-mel frames of the dataset's train split, save the tokenizer artifact to
    `out_dir` (default DATA/tokenizer) and cache the units of every utterance, train and val, beside it."""
    cfg.validate()
    data_dir = Path(data_dir)
    out = Path(out_dir) if out_dir is not None else data_dir / DEFAULT_SUBDIR
    utterances = read_speech_data(data_dir)
    t0 = time.perf_counter()
    log_mel = LogMel(cfg.mel)
    per_file, seconds = [], 0.0
    for u in utterances:
        wave = read_wav(u.audio, cfg.mel.sample_rate)
        per_file.append(log_mel(wave).T)  # (T_i, n_mels)
        seconds += len(wave) / cfg.mel.sample_rate
    train_frames = [f for f, u in zip(per_file, utterances) if u.split == "train"]
    if not train_frames:
        raise DataError(f"{data_dir} has no train utterance to fit the speech tokenizer on")
    frames = torch.cat(train_frames)  # (N, n_mels)
    t1 = time.perf_counter()
    log(
        f"{len(train_frames)} train utterances, {frames.shape[0]} frames ({frames.shape[0] / cfg.mel.frame_rate:.0f} s) "
        f"in {t1 - t0:.1f} s; k-means k={cfg.k} on {min(frames.shape[0], cfg.max_frames)} frames"
    )
    tok, result = fit_tokenizer(frames, cfg)
    log(
        f"k-means: {len(result.inertia) - 1} iterations in {time.perf_counter() - t1:.1f} s, "
        f"mse per dim {result.inertia[0] / cfg.mel.n_mels:.4f} -> {result.inertia[-1] / cfg.mel.n_mels:.4f}"
    )
    tok.save(out)
    units = [tok.encode_frames(f) for f in per_file]
    save_units(out / UNITS_FILE, units, data_dir)
    log(
        f"wrote {out}: {sum(len(u) for u in units)} units for {len(units)} utterances, "
        f"{sum(len(u) for u in units) / seconds:.2f} units per second of audio"
    )
    return tok
