"""Discrete speech units: the nearest of k centroids of normalized log-mel frames, 25 units per second
(training/speech_units.py fits the centroids).

The MoT paper's speech tokens are k-means clusters (vocabulary 500, 25 Hz) of a self-supervised
speech encoder's features. No such encoder can be downloaded here, so motfusion clusters the
log-mel frames themselves: acoustic rather than semantic units, same rate and vocabulary size.

- Encoding: WAV -> log-mel (25 Hz) -> per-dimension standardization -> nearest centroid.
- Consecutive repeats are kept by default (`dedup=False`): a unit then stands for 40 ms, so a
  unit sequence decodes back to audio of the right duration, which text-to-speech needs. With
  `dedup=True` runs collapse to one unit (shorter sequences, durations lost); the unit error rate
  in evaluation/speech.py always compares deduplicated sequences.
- Decoding: units -> log-mel frames -> `MelVocoder` (Griffin-Lim) -> waveform. The frames are the
  units' centroids, or, when the tokenizer directory holds a trained decoder in `decoder/`
  (codecs/unit_decoder.py, `motfusion train-unit-vocoder`), that network's finer frames.
- Saved as an artifact (artifacts.py, kind "speech-units": weights.safetensors with centroids,
  mean and std, config.json); the tokenizer of a dataset also caches every utterance's units
  beside it in `units.safetensors` (flat ids + offsets). Saving new centroids over a directory
  removes the decoder there, which was trained for the old ones.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from motfusion.artifacts import kind_of, load_artifact, save_artifact
from motfusion.codecs.audio import LogMel, MelConfig, read_wav
from motfusion.codecs.unit_decoder import KIND as DECODER_KIND
from motfusion.codecs.unit_decoder import UnitDecoder, load_unit_decoder, save_unit_decoder
from motfusion.codecs.vocoder import MelVocoder, VocoderConfig
from motfusion.config import Config, dataclass_from_dict
from motfusion.errors import ConfigError, DataError
from motfusion.sequence import SEGMENT_ENCODERS, Units

KIND, UNITS_FILE, DECODER_SUBDIR = "speech-units", "units.safetensors", "decoder"


# ---- k-means ---------------------------------------------------------------------------------


def nearest(
    x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D), (K, D) -> index (N,) of each row's nearest centroid and its squared distance (N,)."""
    c_sq = centroids.pow(2).sum(1)  # (K,)
    idx, dist = [], []
    for rows in x.split(chunk):
        d = rows.pow(2).sum(1, keepdim=True) - 2 * rows @ centroids.T + c_sq  # (n, K) squared distances
        best, i = d.min(1)
        idx.append(i)
        dist.append(best.clamp(min=0))
    return torch.cat(idx), torch.cat(dist)


# ---- the tokenizer ---------------------------------------------------------------------------


@dataclass(kw_only=True)
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
    def from_dict(cls, d: dict) -> SpeechTokenizerConfig:
        return dataclass_from_dict(cls, d).validate()

    def validate(self) -> SpeechTokenizerConfig:
        if self.k < 2 or self.iters < 0 or self.max_frames < self.k:
            raise ConfigError(
                f"k={self.k} must be >= 2, iters={self.iters} >= 0 and max_frames={self.max_frames} >= k"
            )
        return self


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
    """WAV <-> units. `centroids` (K, n_mels) live in the standardized log-mel space; `decoder`, if
    any, decodes units to frames in place of the centroids."""

    def __init__(
        self,
        cfg: SpeechTokenizerConfig,
        centroids: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        decoder: UnitDecoder | None = None,
    ):
        if centroids.shape != (cfg.k, cfg.mel.n_mels):
            raise DataError(
                f"centroids of shape {tuple(centroids.shape)} do not match k={cfg.k}, n_mels={cfg.mel.n_mels}"
            )
        if decoder is not None and (decoder.cfg.k, decoder.cfg.n_mels) != (cfg.k, cfg.mel.n_mels):
            raise ConfigError(
                f"a unit decoder for k={decoder.cfg.k}, n_mels={decoder.cfg.n_mels} cannot decode "
                f"units of k={cfg.k}, n_mels={cfg.mel.n_mels}"
            )
        if decoder is not None and cfg.mel.hop % decoder.cfg.upsample:
            raise ConfigError(
                f"mel hop {cfg.mel.hop} is not divisible by decoder upsample {decoder.cfg.upsample}"
            )
        self.cfg, self.centroids, self.mean, self.std = cfg, centroids, mean, std
        self.decoder = decoder
        self.log_mel = LogMel(cfg.mel)

    def with_decoder(self, decoder: UnitDecoder | None) -> SpeechTokenizer:
        """The same units with another decoder (None: the centroids)."""
        return SpeechTokenizer(self.cfg, self.centroids, self.mean, self.std, decoder)

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

    def _check_ids(self, units: torch.Tensor) -> None:
        if units.numel() and (int(units.min()) < 0 or int(units.max()) >= self.cfg.k):
            raise ValueError(
                f"unit ids must be in [0, {self.cfg.k}), got [{int(units.min())}, {int(units.max())}]"
            )

    def decode_mel(self, units: torch.Tensor) -> torch.Tensor:
        """(T,) -> (n_mels, T) log-mel of the units' centroids."""
        self._check_ids(units)
        return (self.centroids[units] * self.std + self.mean).T

    def _decoder(self) -> UnitDecoder:
        if self.decoder is None:
            raise ConfigError("this speech codec has no trained decoder: run motfusion train-unit-vocoder")
        return self.decoder

    @property
    def fine_mel(self) -> MelConfig:
        """The frames the decoder writes: the codec's mel at hop / upsample."""
        return dataclasses.replace(self.cfg.mel, hop=self.cfg.mel.hop // self._decoder().cfg.upsample)

    @torch.no_grad()
    def decoder_mel(self, units: torch.Tensor) -> torch.Tensor:
        """(T,) -> (n_mels, r * (T - 1) + 1) log-mel at hop / r from the decoder (r its upsample):
        frame r * t is unit t's, the frames between lead to unit t + 1's."""
        self._check_ids(units)
        r = self._decoder().cfg.upsample
        frames = self.decoder(units.long()[None].to(self.centroids.device))[0]  # (n_mels, r * T) standardized
        return frames[:, : r * (len(units) - 1) + 1] * self.std[:, None] + self.mean[:, None]

    def decode(self, units: torch.Tensor, vocoder: VocoderConfig | None = None) -> torch.Tensor:
        """(T,) units -> (S,) waveform at `sample_rate` (Griffin-Lim on the decoder's frames, or on the
        centroids' without one); fewer than 2 units: silence. Both give hop * (T - 1) samples."""
        if units.numel() < 2:
            return torch.zeros(self.cfg.mel.hop * max(units.numel(), 1))
        if self.decoder is None:
            return MelVocoder(self.cfg.mel, vocoder)(self.decode_mel(units))
        fine = dataclasses.replace(vocoder or VocoderConfig(), upsample=1)  # the frames are fine already
        return MelVocoder(self.fine_mel, fine)(self.decoder_mel(units))

    def reconstruction_mse(self, wave: torch.Tensor) -> float:
        """Mean squared error, in standardized log-mel, between the frames and their centroids."""
        _, dist = nearest(self.features(wave), self.centroids)
        return float(dist.mean()) / self.cfg.mel.n_mels

    # ---- persistence ----

    def save(self, out_dir: str | Path) -> None:
        """The artifact, and the decoder in OUT/decoder (a decoder already there is removed when
        this tokenizer has none: it was trained for other centroids)."""
        out = save_artifact(
            out_dir,
            KIND,
            {"centroids": self.centroids, "mean": self.mean, "std": self.std},
            self.cfg.to_dict(),
        )
        if self.decoder is not None:
            save_unit_decoder(self.decoder, out / DECODER_SUBDIR, self.centroids)
        elif kind_of(out / DECODER_SUBDIR) == DECODER_KIND:
            shutil.rmtree(out / DECODER_SUBDIR)

    @classmethod
    def load(cls, directory: str | Path) -> SpeechTokenizer:
        """A `motfusion train-speech-tokenizer` directory (or an older centroids.safetensors + config.json)."""
        artifact = load_artifact(
            directory,
            KIND,
            f"train a speech tokenizer with `motfusion train-speech-tokenizer --data DATA --out {directory}`",
        )
        t = artifact.tensors
        decoder_dir = Path(directory) / DECODER_SUBDIR
        decoder = load_unit_decoder(decoder_dir, t["centroids"]) if kind_of(decoder_dir) else None
        return cls(
            SpeechTokenizerConfig.from_dict(artifact.config), t["centroids"], t["mean"], t["std"], decoder
        )


# ---- a dataset's tokenizer and its cached units ---------------------------------------------

DEFAULT_SUBDIR = "tokenizer"  # train-speech-tokenizer's default --out, inside the data directory


def save_units(path: Path, units: list[torch.Tensor], data_dir: Path) -> None:
    """Units of every utterance, in manifest order, as one flat tensor plus offsets; the metadata
    names the dataset they belong to."""
    lengths = torch.tensor([len(u) for u in units], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    flat = torch.cat(units).to(torch.int32) if units else torch.zeros(0, dtype=torch.int32)
    safetensors.torch.save_file(
        {"units": flat, "offsets": offsets}, path, metadata={"data_dir": str(data_dir.resolve())}
    )


def load_units(path: str | Path) -> tuple[list[torch.Tensor], Path]:
    """The cached units, one (T_i,) tensor per manifest line, and the dataset directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run `motfusion train-speech-tokenizer --data DATA --out {path.parent}`"
        )
    with safetensors.safe_open(path, "pt") as f:
        data_dir = Path(f.metadata()["data_dir"])
        flat, offsets = f.get_tensor("units").long(), f.get_tensor("offsets").tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])], data_dir


def resolve_speech_dirs(path: str | Path) -> tuple[Path, Path]:
    """`data.dataset=speech:PATH`: PATH is a tokenizer directory (its units name their dataset) or a
    dataset directory whose tokenizer is in PATH/tokenizer. -> (data_dir, tokenizer_dir)."""
    path = Path(path)
    if kind_of(path) == KIND:
        return load_units(path / UNITS_FILE)[1], path
    if kind_of(path / DEFAULT_SUBDIR) == KIND:
        return path, path / DEFAULT_SUBDIR
    raise FileNotFoundError(
        f"no speech tokenizer at {path} nor at {path / DEFAULT_SUBDIR}: run "
        f"`motfusion make-speech-data --out DATA` then `motfusion train-speech-tokenizer --data DATA`"
    )


# ---- with a trained model --------------------------------------------------------------------


def speech_tokenizer_of(cfg: Config) -> SpeechTokenizer:
    """The speech tokenizer of a run trained on `data.dataset=speech:PATH`."""
    name, _, arg = cfg.data.dataset.partition(":")
    if name != "speech" or "speech" not in cfg.model.vocab_sizes:
        raise ConfigError(
            f"this checkpoint has no speech (data.dataset={cfg.data.dataset!r}, model.vocab_sizes="
            f"{cfg.model.vocab_sizes}): train one with --recipe speech-demo"
        )
    return SpeechTokenizer.load(resolve_speech_dirs(arg)[1])
