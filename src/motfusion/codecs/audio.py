"""Audio in and out, resampling, and the log-mel spectrogram that speech units are cut from.

Written with torch.stft and numpy (torchaudio does not load with torch 2.13): an HTK-scale
triangular mel filterbank and log-mel frames at 16 kHz with a 640-sample hop, i.e. 25 frames per
second, the rate of the MoT paper's speech units. Resampling is soxr's. tests/test_agreement.py
checks the filterbank and the frames against librosa.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from motfusion.errors import ConfigError, DataError


@dataclass(frozen=True, kw_only=True)
class MelConfig:
    sample_rate: int = 16000
    n_fft: int = 1024  # also the Hann window length
    hop: int = 640  # 16000 / 640 = 25 frames per second
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8000.0
    log_floor: float = 1e-5  # log-mel = log(max(mel, floor)): silence maps to log(floor)

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    def validate(self) -> None:
        if not (0 < self.hop and 0 < self.n_mels and 0 <= self.f_min < self.f_max <= self.sample_rate / 2):
            raise ConfigError(
                f"bad mel config {self}: need hop, n_mels > 0 and 0 <= f_min < f_max <= sample_rate / 2"
            )


# ---- audio files -----------------------------------------------------------------------------


def read_wav(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Any file libsndfile reads (WAV, FLAC, ...) -> (S,) float32 mono in [-1, 1] at `sample_rate`."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} not found")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (S, channels)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise DataError(f"cannot read audio file {path}: {e}") from None
    wave = data.mean(axis=1)  # (S,) downmix
    if rate != sample_rate:
        wave = resample(wave, rate, sample_rate)
    return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))


def write_wav(path: str | Path, wave: torch.Tensor | np.ndarray, sample_rate: int) -> None:
    """(S,) float in [-1, 1] -> 16-bit PCM WAV (clipped)."""
    import soundfile as sf

    data = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    sf.write(str(path), np.clip(data, -1.0, 1.0), sample_rate, subtype="PCM_16")


# ---- resampling ------------------------------------------------------------------------------


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """(S,) -> (floor(S * new_rate / orig_rate + 1/2),) float32, band-limited by soxr.

    Quality "HQ", soxr's default: linear phase and 20-bit precision, more than 16-bit audio or
    log-mel features can tell apart (a 440 + 3100 Hz pair taken from 22.05 to 16 kHz lands within
    1e-6 of the same pair sampled at 16 kHz; "VHQ" costs 1.5x the time for 28 bits).
    """
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if orig_rate == new_rate:
        return wave
    try:
        import soxr
    except ImportError:
        raise ConfigError("resampling audio needs soxr: pip install 'motfusion[speech]'") from None
    return soxr.resample(wave, orig_rate, new_rate, quality="HQ")


# ---- mel spectrogram -------------------------------------------------------------------------


def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(cfg: MelConfig) -> torch.Tensor:
    """(n_mels, n_freqs) triangles with peaks of 1 at mel-spaced centers.

    Filter m rises linearly in Hz from center m-1 to center m and falls to center m+1, so between
    the first and the last center the filters sum to exactly 1 (a partition of unity).
    """
    cfg.validate()
    edges = mel_to_hz(
        torch.linspace(
            float(hz_to_mel(cfg.f_min)), float(hz_to_mel(cfg.f_max)), cfg.n_mels + 2, dtype=torch.float64
        )
    )  # (n_mels + 2,)
    freqs = torch.linspace(0, cfg.sample_rate / 2, cfg.n_freqs, dtype=torch.float64)  # (F,)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    rising = (freqs - lo) / (mid - lo)
    falling = (hi - freqs) / (hi - mid)
    return torch.minimum(rising, falling).clamp(min=0).float()  # (n_mels, F)


def stft_magnitude(wave: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(..., S) -> (..., n_fft // 2 + 1, 1 + S // hop) magnitudes, Hann window, centered frames."""
    window = torch.hann_window(n_fft, device=wave.device, dtype=wave.dtype)  # periodic, as librosa's
    spec = torch.stft(wave, n_fft, hop_length=hop, window=window, center=True, return_complex=True)
    return spec.abs()


class LogMel:
    """Waveform -> log-mel frames; holds the filterbank so it is built once."""

    def __init__(self, cfg: MelConfig):
        self.cfg = cfg
        self.filterbank = mel_filterbank(cfg)  # (n_mels, F)

    def mel(self, wave: torch.Tensor) -> torch.Tensor:
        """(..., S) -> (..., n_mels, T) linear-magnitude mel spectrogram."""
        mag = stft_magnitude(wave.float(), self.cfg.n_fft, self.cfg.hop)  # (..., F, T)
        return self.filterbank.to(mag.device) @ mag

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        """(..., S) -> (..., n_mels, T) natural-log mel, T = 1 + S // hop."""
        return self.mel(wave).clamp(min=self.cfg.log_floor).log()

    def num_frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.cfg.hop
