"""From log-mel frames back to a waveform: pseudo-inverse of the filterbank, then Griffin-Lim.

Units come at 25 Hz (hop 640 of a 1024-sample window): too little overlap for Griffin-Lim to find
a consistent phase. So the log-mel is first interpolated in time to a finer hop (160 by default,
4x), where the STFT is redundant enough, and the phase is recovered there with the fast
Griffin-Lim of Perraudin, Balazs and Sondergaard (2013): alternate projections onto the set of
spectrograms with the target magnitude and the set of consistent spectrograms, with momentum.
No neural vocoder is involved, so the audio is robotic but intelligible and fully reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from motfusion.codecs.audio import MelConfig, mel_filterbank
from motfusion.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class VocoderConfig:
    upsample: int = 4  # Griffin-Lim runs at hop = mel hop / upsample
    n_iter: int = 60
    momentum: float = 0.99  # 0 gives the classic Griffin-Lim
    seed: int = 0  # initial random phase


def _stft(wave: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    window = torch.hann_window(n_fft, device=wave.device)
    return torch.stft(wave, n_fft, hop_length=hop, window=window, center=True, return_complex=True)


def _istft(spec: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    window = torch.hann_window(n_fft, device=spec.device)
    return torch.istft(
        spec, n_fft, hop_length=hop, window=window, center=True, length=hop * (spec.shape[-1] - 1)
    )


def griffin_lim(
    magnitude: torch.Tensor,
    n_fft: int,
    hop: int,
    n_iter: int = 60,
    momentum: float = 0.99,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(F, T) target STFT magnitude -> (hop * (T - 1),) waveform whose STFT magnitude approaches it.

    Fast Griffin-Lim: t_n = P_mag(P_consistent(c_{n-1})), c_n = t_n + momentum * (t_n - t_{n-1}).
    """
    magnitude = magnitude.float()
    phase = torch.rand(magnitude.shape, generator=generator, device=magnitude.device) * (2 * torch.pi)
    c = torch.polar(magnitude, phase)  # (F, T) complex
    prev = c
    for _ in range(n_iter):
        rebuilt = _stft(_istft(c, n_fft, hop), n_fft, hop)  # (F, T), nearest consistent spectrogram
        t = magnitude * torch.exp(1j * rebuilt.angle())
        c = t + momentum * (t - prev)
        prev = t
    return _istft(prev, n_fft, hop)


def spectral_convergence(wave: torch.Tensor, magnitude: torch.Tensor, n_fft: int, hop: int) -> float:
    """|| |STFT(wave)| - magnitude ||_F / || magnitude ||_F: 0 when the magnitudes match exactly."""
    got = _stft(wave.float(), n_fft, hop).abs()[..., : magnitude.shape[-1]]
    return float((got - magnitude).norm() / magnitude.norm().clamp(min=1e-12))


class MelVocoder:
    """log-mel (n_mels, T) at the feature hop -> waveform at the feature sample rate."""

    def __init__(self, mel: MelConfig, cfg: VocoderConfig | None = None):
        self.mel, self.cfg = mel, cfg or VocoderConfig()
        if self.mel.hop % self.cfg.upsample:
            raise ConfigError(
                f"mel hop {self.mel.hop} is not divisible by vocoder upsample {self.cfg.upsample}"
            )
        self.hop = self.mel.hop // self.cfg.upsample
        self.inverse = torch.linalg.pinv(mel_filterbank(mel).double()).float()  # (F, n_mels)

    def magnitude(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(n_mels, T) log-mel -> (F, upsample * (T - 1) + 1) linear STFT magnitude at the fine hop."""
        T = log_mel.shape[-1]
        fine = F.interpolate(
            log_mel[None].float(), size=self.cfg.upsample * (T - 1) + 1, mode="linear", align_corners=True
        )[0]  # (n_mels, T') log-mel on the fine frame grid
        return (self.inverse.to(fine.device) @ fine.exp()).clamp(min=0)  # (F, T')

    def __call__(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(n_mels, T) -> (hop_fine * (T' - 1),) samples, about T / frame_rate seconds."""
        g = torch.Generator(device=log_mel.device).manual_seed(self.cfg.seed)
        wave = griffin_lim(
            self.magnitude(log_mel), self.mel.n_fft, self.hop, self.cfg.n_iter, self.cfg.momentum, g
        )
        return wave / wave.abs().max().clamp(min=1e-6) * 0.9  # peak-normalized: mel energy is not calibrated
