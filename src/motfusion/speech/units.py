"""Discrete speech units: k-means over normalized log-mel frames, 25 units per second.

The MoT paper's speech tokens are k-means clusters (vocabulary 500, 25 Hz) of a self-supervised
speech encoder's features. No such encoder can be downloaded here, so motfusion clusters the
log-mel frames themselves: acoustic rather than semantic units, same rate and vocabulary size.

- Encoding: WAV -> log-mel (25 Hz) -> per-dimension standardization -> nearest centroid.
- Consecutive repeats are kept by default (`dedup=False`): a unit then stands for 40 ms, so a
  unit sequence decodes back to audio of the right duration, which text-to-speech needs. With
  `dedup=True` runs collapse to one unit (shorter sequences, durations lost); the unit error rate
  in `motfusion.speech.metrics` always compares deduplicated sequences.
- Decoding: units -> centroid log-mel frames -> `MelVocoder` (Griffin-Lim) -> waveform.
- Saved as `centroids.safetensors` (centroids, mean, std) + `config.json`; the tokenizer of a
  dataset also caches every utterance's units in `units.safetensors` (flat ids + offsets).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import safetensors.torch
import torch

from motfusion.config import Config
from motfusion.errors import ConfigError, DataError
from motfusion.sequence import SEGMENT_ENCODERS, Units
from motfusion.speech.features import LogMel, MelConfig, read_wav
from motfusion.speech.vocoder import MelVocoder, VocoderConfig

if TYPE_CHECKING:
    from motfusion.sampling import Generator

CONFIG_FILE, CENTROIDS_FILE, UNITS_FILE = "config.json", "centroids.safetensors", "units.safetensors"


# ---- k-means ---------------------------------------------------------------------------------

def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D), (K, D) -> index (N,) of each row's nearest centroid and its squared distance (N,)."""
    c_sq = centroids.pow(2).sum(1)  # (K,)
    idx, dist = [], []
    for rows in x.split(chunk):
        d = rows.pow(2).sum(1, keepdim=True) - 2 * rows @ centroids.T + c_sq  # (n, K) squared distances
        best, i = d.min(1)
        idx.append(i)
        dist.append(best.clamp(min=0))
    return torch.cat(idx), torch.cat(dist)


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
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # (K, D)
        counts = torch.bincount(assign, minlength=k)  # (K,)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        for empty in (counts == 0).nonzero().flatten().tolist():
            worst = int(dist.argmax())
            centroids[empty], dist[worst] = x[worst], 0.0
        assign, dist = nearest(x, centroids)
        inertia.append(float(dist.mean()))
        if inertia[-2] - inertia[-1] <= tol * inertia[-2]:
            break
    return KMeansResult(centroids, inertia)


# ---- the tokenizer ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SpeechTokenizerConfig:
    k: int = 500  # vocabulary size
    iters: int = 25  # Lloyd iterations (at most)
    max_frames: int = 100_000  # frames sampled from the data to fit k-means on
    seed: int = 0
    dedup: bool = False  # collapse consecutive repeated units when encoding
    mel: MelConfig = field(default_factory=MelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpeechTokenizerConfig":
        d = dict(d)
        d["mel"] = MelConfig(**d["mel"])
        return cls(**d)


@dataclass(frozen=True)
class Speech(Units):
    """Speech in a document: its units, between <bosp> and <eosp>, as the generic `Units` span of
    the "speech" modality (the model predicts where the span ends). `Speech(ids)`, ids (L,) in [0, k)."""

    modality: str = field(default="speech", init=False)


SEGMENT_ENCODERS[Speech] = SEGMENT_ENCODERS[Units]


def dedup(units: torch.Tensor) -> torch.Tensor:
    """(T,) -> (T',): runs of the same unit collapsed to one."""
    return torch.unique_consecutive(units)


class SpeechTokenizer:
    """WAV <-> units. `centroids` (K, n_mels) live in the standardized log-mel space."""

    def __init__(self, cfg: SpeechTokenizerConfig, centroids: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        if centroids.shape != (cfg.k, cfg.mel.n_mels):
            raise DataError(f"centroids of shape {tuple(centroids.shape)} do not match k={cfg.k}, n_mels={cfg.mel.n_mels}")
        self.cfg, self.centroids, self.mean, self.std = cfg, centroids, mean, std
        self.log_mel = LogMel(cfg.mel)

    @property
    def vocab_size(self) -> int:
        return self.cfg.k

    @property
    def sample_rate(self) -> int:
        return self.cfg.mel.sample_rate

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """(S,) -> (T, n_mels) standardized log-mel frames."""
        return (self.log_mel(wave).T - self.mean) / self.std

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(T, n_mels) raw log-mel frames -> (T,) unit ids (fewer with dedup)."""
        units, _ = nearest((frames - self.mean) / self.std, self.centroids)
        return dedup(units) if self.cfg.dedup else units

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """(S,) samples at `sample_rate` -> (T,) unit ids, T = 1 + S // hop (fewer with dedup)."""
        return self.encode_frames(self.log_mel(wave).T)

    def encode_file(self, path: str | Path) -> torch.Tensor:
        return self.encode(read_wav(path, self.sample_rate))

    def decode_mel(self, units: torch.Tensor) -> torch.Tensor:
        """(T,) -> (n_mels, T) log-mel of the units' centroids."""
        if units.numel() and (int(units.min()) < 0 or int(units.max()) >= self.cfg.k):
            raise ValueError(f"unit ids must be in [0, {self.cfg.k}), got [{int(units.min())}, {int(units.max())}]")
        return (self.centroids[units] * self.std + self.mean).T

    def decode(self, units: torch.Tensor, vocoder: VocoderConfig | None = None) -> torch.Tensor:
        """(T,) units -> (S,) waveform at `sample_rate` (Griffin-Lim); fewer than 2 units: silence."""
        if units.numel() < 2:
            return torch.zeros(self.cfg.mel.hop * max(units.numel(), 1))
        return MelVocoder(self.cfg.mel, vocoder)(self.decode_mel(units))

    def reconstruction_mse(self, wave: torch.Tensor) -> float:
        """Mean squared error, in standardized log-mel, between the frames and their centroids."""
        _, dist = nearest(self.features(wave), self.centroids)
        return float(dist.mean()) / self.cfg.mel.n_mels

    # ---- persistence ----

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"centroids": self.centroids.contiguous(), "mean": self.mean.contiguous(), "std": self.std.contiguous()}
        safetensors.torch.save_file(tensors, out / CENTROIDS_FILE)
        (out / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "SpeechTokenizer":
        d = Path(directory)
        for name in (CONFIG_FILE, CENTROIDS_FILE):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} not found: train a speech tokenizer with "
                                        f"`motfusion train-speech-tokenizer --data DATA --out {d}`")
        cfg = SpeechTokenizerConfig.from_dict(json.loads((d / CONFIG_FILE).read_text()))
        t = safetensors.torch.load_file(d / CENTROIDS_FILE)
        return cls(cfg, t["centroids"], t["mean"], t["std"])


def fit_tokenizer(frames: torch.Tensor, cfg: SpeechTokenizerConfig) -> tuple[SpeechTokenizer, KMeansResult]:
    """frames: (N, n_mels) log-mel frames -> a tokenizer whose centroids are k-means of the
    standardized frames (a random subset of at most `cfg.max_frames`, drawn with `cfg.seed`)."""
    g = torch.Generator().manual_seed(cfg.seed)
    if frames.shape[0] > cfg.max_frames:
        frames = frames[torch.randperm(frames.shape[0], generator=g)[: cfg.max_frames]]
    mean, std = frames.mean(0), frames.std(0).clamp(min=1e-3)  # (n_mels,) each
    result = kmeans((frames - mean) / std, cfg.k, cfg.iters, cfg.seed)
    return SpeechTokenizer(cfg, result.centroids, mean, std), result


# ---- a dataset's tokenizer and its cached units ---------------------------------------------

DEFAULT_SUBDIR = "tokenizer"  # train-speech-tokenizer's default --out, inside the data directory


def save_units(path: Path, units: list[torch.Tensor], data_dir: Path) -> None:
    """Units of every utterance, in manifest order, as one flat tensor plus offsets; the metadata
    names the dataset they belong to."""
    lengths = torch.tensor([len(u) for u in units], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    flat = torch.cat(units).to(torch.int32) if units else torch.zeros(0, dtype=torch.int32)
    safetensors.torch.save_file({"units": flat, "offsets": offsets}, path, metadata={"data_dir": str(data_dir.resolve())})


def load_units(path: str | Path) -> tuple[list[torch.Tensor], Path]:
    """The cached units, one (T_i,) tensor per manifest line, and the dataset directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `motfusion train-speech-tokenizer --data DATA --out {path.parent}`")
    with safetensors.safe_open(path, "pt") as f:
        data_dir = Path(f.metadata()["data_dir"])
        flat, offsets = f.get_tensor("units").long(), f.get_tensor("offsets").tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])], data_dir


def resolve_speech_dirs(path: str | Path) -> tuple[Path, Path]:
    """`data.dataset=speech:PATH`: PATH is a tokenizer directory (its units name their dataset) or a
    dataset directory whose tokenizer is in PATH/tokenizer. -> (data_dir, tokenizer_dir)."""
    path = Path(path)
    if (path / CENTROIDS_FILE).is_file():
        return load_units(path / UNITS_FILE)[1], path
    if (path / DEFAULT_SUBDIR / CENTROIDS_FILE).is_file():
        return path, path / DEFAULT_SUBDIR
    raise FileNotFoundError(f"no speech tokenizer at {path} nor at {path / DEFAULT_SUBDIR}: run "
                            f"`motfusion make-speech-data --out DATA` then `motfusion train-speech-tokenizer --data DATA`")


def train_speech_tokenizer(data_dir: str | Path, out_dir: str | Path | None, cfg: SpeechTokenizerConfig,
                           log: Callable[[str], None] = partial(print, flush=True)) -> SpeechTokenizer:
    """Fit k-means on the log-mel frames of the dataset's train split, save the tokenizer to
    `out_dir` (default DATA/tokenizer) and cache the units of every utterance, train and val."""
    from motfusion.speech.synth import read_speech_data

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
    log(f"{len(train_frames)} train utterances, {frames.shape[0]} frames ({frames.shape[0] / cfg.mel.frame_rate:.0f} s) "
        f"in {t1 - t0:.1f} s; k-means k={cfg.k} on {min(frames.shape[0], cfg.max_frames)} frames")
    tok, result = fit_tokenizer(frames, cfg)
    log(f"k-means: {len(result.inertia) - 1} iterations in {time.perf_counter() - t1:.1f} s, "
        f"mse per dim {result.inertia[0] / cfg.mel.n_mels:.4f} -> {result.inertia[-1] / cfg.mel.n_mels:.4f}")
    tok.save(out)
    units = [tok.encode_frames(f) for f in per_file]
    save_units(out / UNITS_FILE, units, data_dir)
    log(f"wrote {out}: {sum(len(u) for u in units)} units for {len(units)} utterances, "
        f"{sum(len(u) for u in units) / seconds:.2f} units per second of audio")
    return tok


# ---- with a trained model --------------------------------------------------------------------

MAX_SPEECH_SECONDS = 12.0  # longest speech a model may write before it is cut


def speech_tokenizer_of(cfg: Config) -> SpeechTokenizer:
    """The speech tokenizer of a run trained on `data.dataset=speech:PATH`."""
    name, _, arg = cfg.data.dataset.partition(":")
    if name != "speech" or "speech" not in cfg.model.vocab_sizes:
        raise ConfigError(f"this checkpoint has no speech (data.dataset={cfg.data.dataset!r}, model.vocab_sizes="
                          f"{cfg.model.vocab_sizes}): train one with --recipe speech-demo")
    return SpeechTokenizer.load(resolve_speech_dirs(arg)[1])


def text_to_units(gen: Generator, stok: SpeechTokenizer, texts: list[str], generator: torch.Generator | None = None,
                  max_units: int | None = None) -> list[torch.Tensor]:
    """Text -> speech units sampled by the model (until it ends the span, or `max_units`, by default
    MAX_SPEECH_SECONDS), one (T_i,) tensor per text."""
    max_units = max_units or int(MAX_SPEECH_SECONDS * stok.cfg.mel.frame_rate)
    return [torch.tensor(u, dtype=torch.long) for u in gen.units(texts, "speech", generator, max_units=max_units)]


def speech_to_text(gen: Generator, units: list[torch.Tensor], generator: torch.Generator | None = None) -> list[str]:
    """Speech units -> the model's transcripts."""
    return gen.transcribe([u.tolist() for u in units], "speech", generator)
