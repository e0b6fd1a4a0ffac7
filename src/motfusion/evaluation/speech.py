"""Speech metrics: edit distance, character error rate, unit error rate.

- CER of speech-to-text: character-level Levenshtein distance between the transcript and the
  reference text (both normalized as the dataset normalizes them), summed over utterances and
  divided by the total reference length (a corpus-level rate, as ASR toolkits report it).
- Unit error rate of text-to-speech: the generated units against the units of espeak-ng's own
  recording of the same text. Frame-wise accuracy would punish any difference in speaking rate or
  a pause shifted by one frame, so both sequences are first deduplicated (runs of a unit -> one
  unit, which removes durations) and then aligned by edit distance:
  UER = Levenshtein(dedup(hyp), dedup(ref)) / len(dedup(ref)), and unit accuracy = max(0, 1 - UER).
  The reference is one espeak-ng voice, so even a perfect speaker in another voice scores below 1.
- Speech validation loss (`val_loss/speech`) comes from the objective's per-modality breakdown on
  val batches (motfusion.evaluation.image_metrics.validation_losses).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from motfusion.codecs.speech import (
    UNITS_FILE,
    dedup,
    load_units,
    resolve_speech_dirs,
    speech_tokenizer_of,
)
from motfusion.config import Config
from motfusion.data.espeak import normalize
from motfusion.data.speech import read_speech_data
from motfusion.errors import ConfigError, DataError
from motfusion.sampling.generate import Generator
from motfusion.sampling.speech import speech_to_text, text_to_units

T = TypeVar("T")


def levenshtein(hyp: Sequence[T], ref: Sequence[T]) -> int:
    """Minimum number of insertions, deletions and substitutions turning `hyp` into `ref`."""
    prev = list(range(len(ref) + 1))  # distances from hyp[:0] to each prefix of ref
    for i, h in enumerate(hyp, 1):
        cur = [i]
        for j, r in enumerate(ref, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (h != r)))
        prev = cur
    return prev[-1]


def error_rate(hyps: Sequence[Sequence[T]], refs: Sequence[Sequence[T]]) -> float:
    """Sum of edit distances / sum of reference lengths. Can exceed 1 (many insertions)."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("the references are empty")
    return sum(levenshtein(h, r) for h, r in zip(hyps, refs)) / total


def cer(hyps: Sequence[str], refs: Sequence[str], normalized: bool = True) -> float:
    """Character error rate; with `normalized` both sides go through the dataset's text normalization."""
    if normalized:
        hyps, refs = [normalize(h) for h in hyps], [normalize(r) for r in refs]
    return error_rate(hyps, refs)


def unit_error_rate(hyps: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> float:
    """Edit distance between run-collapsed unit sequences / collapsed reference length."""
    collapse = lambda units: dedup(torch.as_tensor(list(units), dtype=torch.long)).tolist()
    return error_rate([collapse(h) for h in hyps], [collapse(r) for r in refs])


def evaluate_speech(
    gen: Generator, cfg: Config, *, n: int = 64, seed: int = 0, batch_size: int = 16
) -> dict[str, float]:
    """Speech-to-text CER and text-to-speech unit error rate on the first `n` val utterances of the
    run's speech dataset; the references are the units of espeak-ng's recordings (cached)."""
    name, _, arg = cfg.data.dataset.partition(":")
    if name != "speech":
        raise ConfigError(
            f"--suite speech needs a run trained on data.dataset=speech:DIR, not {cfg.data.dataset!r}"
        )
    stok = speech_tokenizer_of(cfg)
    data_dir, tok_dir = resolve_speech_dirs(arg)
    all_units, _ = load_units(tok_dir / UNITS_FILE)
    val = [(u.text, all_units[i]) for i, u in enumerate(read_speech_data(data_dir)) if u.split == "val"][:n]
    if not val:
        raise DataError(f"{data_dir} has no val utterance to evaluate on")
    texts, refs = [t for t, _ in val], [u for _, u in val]
    g = torch.Generator(device=gen.device).manual_seed(seed)
    chunks = range(0, len(val), batch_size)
    transcripts = [t for i in chunks for t in speech_to_text(gen, refs[i : i + batch_size], g)]
    spoken = []
    for i in chunks:  # cut at twice the longest reference: a model that never ends its span costs no more
        limit = 2 * max(len(r) for r in refs[i : i + batch_size]) + 10
        spoken += text_to_units(gen, stok, texts[i : i + batch_size], g, max_units=limit)
    uer = unit_error_rate(spoken, refs)
    return {
        "speech_cer": cer(transcripts, texts),
        "speech_unit_error_rate": uer,
        "speech_unit_accuracy": max(0.0, 1.0 - uer),
        "speech_length_ratio": sum(len(u) for u in spoken)
        / sum(len(u) for u in refs),  # generated / reference units
        "speech_n": float(len(val)),
    }
