"""Speech metrics: edit distance, character and word error rates, unit error rate, and the judge's.

- CER of speech-to-text: character-level Levenshtein distance between the transcript and the
  reference text (both normalized as the dataset normalizes them), summed over utterances and
  divided by the total reference length (a corpus-level rate, as ASR toolkits report it).
- Unit error rate of text-to-speech: the generated units against the units of espeak-ng's own
  recording of the same text. Frame-wise accuracy would punish any difference in speaking rate or
  a pause shifted by one frame, so both sequences are first deduplicated (runs of a unit -> one
  unit, which removes durations) and then aligned by edit distance:
  UER = Levenshtein(dedup(hyp), dedup(ref)) / len(dedup(ref)), and unit accuracy = max(0, 1 - UER).
  The reference is one espeak-ng voice, so even a perfect speaker in another voice scores below 1.
- WER: the same at the level of words (split on spaces after normalization), as jiwer counts it.
- `speech_tts_wer_self` / `speech_tts_cer_self`: the model's own speech-to-text reading its
  text-to-speech units, against the prompts; a second check, not an independent one (a model can
  understand speech no listener would).
- `wer_judge` / `cer_judge`: the error rates of a separate CTC recogniser (codecs/asr.py, trained
  on the dataset's real audio) transcribing speech decoded to audio. For text-to-speech, the
  suite's generated units go through the codec (its decoder when it has one) and the judge reads
  them against the prompts: `speech_tts_wer_judge`. The judge comes from DATA/asr-judge, where
  `motfusion train-asr-judge --data DATA` puts it, when it is there (or from `judge=`); its own
  error rates on the real audio (evaluation/asr_judge.py) are the floor to compare with.
- Speech validation loss (`val_loss/speech`) comes from the objective's per-modality breakdown on
  val batches (motfusion.evaluation.image_metrics.validation_losses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from motfusion.artifacts import kind_of
from motfusion.codecs.asr import DEFAULT_SUBDIR as JUDGE_SUBDIR
from motfusion.codecs.asr import KIND as JUDGE_KIND
from motfusion.codecs.asr import load_judge
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


def wer(hyps: Sequence[str], refs: Sequence[str], normalized: bool = True) -> float:
    """Word error rate: word-level edit distances summed over utterances / total reference words."""
    if normalized:
        hyps, refs = [normalize(h) for h in hyps], [normalize(r) for r in refs]
    return error_rate([h.split() for h in hyps], [r.split() for r in refs])


def judge_scores(heard: Sequence[str], texts: Sequence[str]) -> dict[str, float]:
    """A judge's transcripts (`AsrJudge.transcribe`) -> its WER and CER against `texts`."""
    return {"wer_judge": wer(heard, texts), "cer_judge": cer(heard, texts)}


def find_judge(data_dir: Path, judge: str | Path | None = None) -> Path | None:
    """`judge` if given (it must hold one), else DATA/asr-judge if it holds one, else None."""
    if judge is not None:
        return Path(judge)
    default = Path(data_dir) / JUDGE_SUBDIR
    return default if kind_of(default) == JUDGE_KIND else None


def unit_error_rate(hyps: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> float:
    """Edit distance between run-collapsed unit sequences / collapsed reference length."""
    collapse = lambda units: dedup(torch.as_tensor(list(units), dtype=torch.long)).tolist()
    return error_rate([collapse(h) for h in hyps], [collapse(r) for r in refs])


def read_units(
    gen: Generator, units: list[torch.Tensor], generator: torch.Generator, batch_size: int
) -> list[str]:
    """The model's speech-to-text of each unit sequence, `batch_size` at a time; an empty one (a
    model that closed its speech span at once) reads as ""."""
    said = [i for i, u in enumerate(units) if len(u)]
    heard = [
        t
        for i in range(0, len(said), batch_size)
        for t in speech_to_text(gen, [units[j] for j in said[i : i + batch_size]], generator)
    ]
    out = [""] * len(units)
    for j, t in zip(said, heard):
        out[j] = t
    return out


@dataclass
class SpeechEval:
    """What `evaluate_speech` heard and said, per val utterance, and its metrics."""

    texts: list[str]  # the val utterances' transcripts (the text-to-speech prompts)
    audio: list[Path]  # espeak-ng's recordings of them
    refs: list[torch.Tensor]  # their units (the speech-to-text inputs)
    transcripts: list[str]  # the model's speech-to-text
    spoken: list[torch.Tensor]  # the model's text-to-speech units
    waves: list[torch.Tensor] | None  # `spoken` decoded to audio by the codec; None without a judge
    sample_rate: int  # of `waves`
    heard: list[str] | None  # the judge's transcripts of `waves`
    metrics: dict[str, float]


def evaluate_speech(
    gen: Generator,
    cfg: Config,
    *,
    n: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    judge: str | Path | None = None,
) -> SpeechEval:
    """Speech-to-text CER and text-to-speech unit error rate on the first `n` val utterances of the
    run's speech dataset; the references are the units of espeak-ng's recordings (cached). With a
    judge (`judge`, or DATA/asr-judge), also the judge's WER and CER on the spoken units' audio."""
    name, _, arg = cfg.data.dataset.partition(":")
    if name != "speech":
        raise ConfigError(
            f"--suite speech needs a run trained on data.dataset=speech:DIR, not {cfg.data.dataset!r}"
        )
    stok = speech_tokenizer_of(cfg)
    data_dir, tok_dir = resolve_speech_dirs(arg)
    all_units, _ = load_units(tok_dir / UNITS_FILE)
    val = [(u, all_units[i]) for i, u in enumerate(read_speech_data(data_dir)) if u.split == "val"][:n]
    if not val:
        raise DataError(f"{data_dir} has no val utterance to evaluate on")
    texts, refs = [u.text for u, _ in val], [units for _, units in val]
    g = torch.Generator(device=gen.device).manual_seed(seed)
    chunks = range(0, len(val), batch_size)
    transcripts = read_units(gen, refs, g, batch_size)
    spoken = []
    for i in chunks:  # cut at twice the longest reference: a model that never ends its span costs no more
        limit = 2 * max(len(r) for r in refs[i : i + batch_size]) + 10
        spoken += text_to_units(gen, stok, texts[i : i + batch_size], g, max_units=limit)
    uer = unit_error_rate(spoken, refs)
    self_heard = read_units(gen, spoken, g, batch_size)
    metrics = {
        "speech_cer": cer(transcripts, texts),
        "speech_wer": wer(transcripts, texts),
        "speech_tts_wer_self": wer(self_heard, texts),  # the model reading its own speech: not independent
        "speech_tts_cer_self": cer(self_heard, texts),
        "speech_unit_error_rate": uer,
        "speech_unit_accuracy": max(0.0, 1.0 - uer),
        "speech_length_ratio": sum(len(u) for u in spoken)
        / sum(len(u) for u in refs),  # generated / reference units
        "speech_n": float(len(val)),
    }
    waves = heard = None
    judge_dir = find_judge(data_dir, judge)
    if judge_dir is not None:
        waves = [stok.decode(u.cpu()) for u in spoken]
        heard = load_judge(judge_dir).transcribe(waves)
        metrics.update({f"speech_tts_{k}": v for k, v in judge_scores(heard, texts).items()})
    audio = [u.audio for u, _ in val]
    return SpeechEval(texts, audio, refs, transcripts, spoken, waves, stok.sample_rate, heard, metrics)
