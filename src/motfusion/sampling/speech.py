"""Speech through a Generator: text to speech units (to a waveform with the unit codec) and speech
units to text. The same `units` / `transcribe` decoding modes as any discrete span modality."""

from __future__ import annotations

import torch

from motfusion.codecs.speech import SpeechTokenizer
from motfusion.sampling.generate import Generator

MAX_SPEECH_SECONDS = 12.0  # longest speech a model may write before it is cut


def text_to_units(
    gen: Generator,
    stok: SpeechTokenizer,
    texts: list[str],
    generator: torch.Generator | None = None,
    max_units: int | None = None,
) -> list[torch.Tensor]:
    """Text -> speech units sampled by the model (until it ends the span, or `max_units`, by default
    MAX_SPEECH_SECONDS), one (T_i,) tensor per text."""
    max_units = max_units or int(MAX_SPEECH_SECONDS * stok.cfg.mel.frame_rate)
    return [
        torch.tensor(u, dtype=torch.long) for u in gen.units(texts, "speech", generator, max_units=max_units)
    ]


def speech_to_text(
    gen: Generator, units: list[torch.Tensor], generator: torch.Generator | None = None
) -> list[str]:
    """Speech units -> the model's transcripts."""
    return gen.transcribe([u.tolist() for u in units], "speech", generator)
