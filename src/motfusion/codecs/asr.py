"""A small CTC speech recogniser: the judge that reads back the speech motfusion makes.

It is not the model under test: it never sees speech units, only log-mels of real audio, so its
word error rate on resynthesized or generated speech (`wer_judge`, evaluation/asr_judge.py and
evaluation/speech.py) says whether a listener who knows espeak-ng's voices could understand it.

- Features: log-mel at 100 frames per second (hop 160, a 25 ms window), standardized per utterance
  and per mel bin, so loudness and the vocoder's peak normalization do not matter.
- Network: two 1-D convolutions (the first with stride `stride`: 33 outputs per second, room for
  CTC's blanks between the 17 characters per second espeak-ng speaks, 22 at the fastest 1%), a
  bidirectional GRU, and a linear head over ALPHABET plus the CTC blank.
- Decoding: greedy CTC (`ctc_greedy`): the best label per output frame, repeats collapsed, blanks
  dropped. No language model, so an unseen word is spelled as it sounds: most of the judge's word
  errors on real audio are such spellings ("dringk", "markit"), which is why its CER is reported
  beside its WER.
- Trained by training/asr_judge.py (`motfusion train-asr-judge`); saved as an artifact
  (artifacts.py, kind "asr-judge"), by default in DATA/asr-judge, where the speech suite finds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from motfusion.artifacts import load_artifact, save_artifact
from motfusion.codecs.audio import LogMel, MelConfig
from motfusion.config import TrackingConfig, dataclass_from_dict
from motfusion.errors import ConfigError, DataError

KIND, DEFAULT_SUBDIR = "asr-judge", "asr-judge"  # train-asr-judge's default --out: DATA/asr-judge
ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"  # the dataset's normalized text (data/espeak.py normalize)
BLANK = 0  # character ALPHABET[i] has label i + 1


def text_labels(text: str) -> list[int]:
    """A normalized transcript -> its CTC labels (1 .. len(ALPHABET))."""
    bad = sorted(set(text) - set(ALPHABET))
    if bad:
        raise DataError(f"transcript {text!r} has characters {bad} outside the judge's alphabet {ALPHABET!r}")
    return [ALPHABET.index(c) + 1 for c in text]


def ctc_greedy(labels: Sequence[int]) -> str:
    """Best label per frame -> text: runs of one label collapse to one, then blanks are dropped, so a
    true double letter needs a blank between its two frames ("l", blank, "l" -> "ll")."""
    out, prev = [], BLANK
    for label in labels:
        if label != prev and label != BLANK:
            out.append(ALPHABET[label - 1])
        prev = label
    return "".join(out)


@dataclass(kw_only=True)
class AsrConfig(TrackingConfig):
    """The recogniser's features, architecture and training run (and where it logs: TrackingConfig)."""

    # features
    n_mels: int = 80
    n_fft: int = 400  # also the window: 25 ms
    hop: int = 160  # 100 frames per second
    # architecture
    channels: int = 192  # of the convolutions
    stride: int = 3  # input frames per output frame
    hidden: int = 160  # GRU units per direction
    layers: int = 2
    dropout: float = 0.1
    # training
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3  # warmup, then cosine decay to lr / 20
    warmup: int = 100
    weight_decay: float = 0.01
    time_masks: int = 2  # SpecAugment: masks per utterance, each up to time_mask frames
    time_mask: int = 15
    freq_masks: int = 2  # and up to freq_mask mel bins each
    freq_mask: int = 8
    seed: int = 0
    log_every: int = 100

    @property
    def mel(self) -> MelConfig:
        return MelConfig(n_fft=self.n_fft, hop=self.hop, n_mels=self.n_mels)

    def validate(self) -> AsrConfig:
        positive = ("n_mels", "n_fft", "hop", "channels", "stride", "hidden", "layers", "steps", "batch_size")
        if min(getattr(self, k) for k in positive) <= 0 or self.lr <= 0 or self.log_every <= 0:
            raise ConfigError(f"asr judge keys {', '.join(positive)}, lr and log_every must be positive")
        if min(self.time_masks, self.time_mask, self.freq_masks, self.freq_mask, self.warmup) < 0:
            raise ConfigError("asr judge masks, mask sizes and warmup must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        self.mel.validate()
        self.check_tracking()
        return self


class AsrJudge(nn.Module):
    """Standardized log-mel frames -> CTC logits over blank + ALPHABET."""

    def __init__(self, cfg: AsrConfig):
        super().__init__()
        self.cfg = cfg
        self.log_mel = LogMel(cfg.mel)
        C = cfg.channels
        self.conv1 = nn.Conv1d(cfg.n_mels, C, 5, stride=cfg.stride, padding=2)
        self.conv2 = nn.Conv1d(C, C, 5, padding=2)
        self.rnn = nn.GRU(
            C,
            cfg.hidden,
            cfg.layers,
            batch_first=True,
            bidirectional=True,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0,  # between layers only
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(2 * cfg.hidden, len(ALPHABET) + 1)

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """(S,) samples at 16 kHz -> (T, n_mels) log-mel, standardized over the utterance's frames."""
        x = self.log_mel(wave.float()).T  # (T, n_mels)
        return (x - x.mean(0)) / x.std(0, correction=0).clamp(min=1e-3)

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Input frames -> output frames of the strided convolution (kernel 5, padding 2)."""
        return (lengths - 1) // self.cfg.stride + 1

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, n_mels), zero past each row's length -> logits (B, T', V) and lengths (B,).
        Padding changes nothing: convolution outputs past a row's end are zeroed, as the padding of
        a lone row is, and the GRU runs on the packed rows."""
        out_len = self.out_lengths(lengths)
        T_out = int(self.out_lengths(torch.tensor(x.shape[1])))
        mask = (torch.arange(T_out, device=x.device) < out_len[:, None])[:, None]  # (B, 1, T')
        h = F.gelu(self.conv1(x.transpose(1, 2))) * mask  # (B, C, T')
        h = F.gelu(self.conv2(h)) * mask
        packed = pack_padded_sequence(
            h.transpose(1, 2), out_len.cpu(), batch_first=True, enforce_sorted=False
        )
        h, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=T_out)
        return self.head(self.drop(h)), out_len  # (B, T', V)

    @torch.no_grad()
    def transcribe(self, waves: Sequence[torch.Tensor], batch_size: int = 16) -> list[str]:
        """Waveforms (S_i,) at 16 kHz -> greedy CTC transcripts, `batch_size` at a time."""
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        texts = []
        for i in range(0, len(waves), batch_size):
            feats = [self.features(w.to(device)) for w in waves[i : i + batch_size]]
            lengths = torch.tensor([len(f) for f in feats], device=device)
            logits, out_len = self(pad_sequence(feats, batch_first=True), lengths)  # (B, T', V)
            best = logits.argmax(-1).tolist()
            texts += [ctc_greedy(row[:n]) for row, n in zip(best, out_len.tolist())]
        self.train(was_training)
        return texts


def save_judge(model: AsrJudge, out: str | Path, info: dict | None = None) -> Path:
    return save_artifact(out, KIND, model.state_dict(), dataclasses.asdict(model.cfg), info)


def load_judge(path: str | Path, device: torch.device | str = "cpu") -> AsrJudge:
    """A `motfusion train-asr-judge` directory -> its recogniser, in eval mode."""
    artifact = load_artifact(
        path, KIND, f"train one with `motfusion train-asr-judge --data DATA --out {path}`"
    )
    model = AsrJudge(dataclass_from_dict(AsrConfig, artifact.config).validate())
    model.load_state_dict(artifact.tensors)
    return model.to(device).eval()
