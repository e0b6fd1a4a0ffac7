"""What the judge reads (codecs/asr.py): its own error rates on a dataset's real val audio, and the
same audio after a trip through the speech codec (`motfusion eval-speech-codec`).

Resynthesis isolates the codec from the language model: real audio -> units -> audio, then the
judge. Each way back to audio is one row, from the real audio down to the units:

- original: the judge's floor on espeak-ng's own audio.
- 25 Hz log-mel + Griffin-Lim: the real log-mel at the units' rate through the vocoder, what the
  centroids could reach at best; 100 Hz log-mel + Griffin-Lim: the same at the decoder's rate.
- units -> centroids: each unit's centroid frame, interpolated, through Griffin-Lim.
- units -> decoder: the trained unit decoder's frames (codecs/unit_decoder.py), when the codec has one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from motfusion.codecs.asr import AsrConfig, AsrJudge
from motfusion.codecs.audio import LogMel, read_wav
from motfusion.codecs.speech import SpeechTokenizer
from motfusion.codecs.vocoder import MelVocoder, VocoderConfig
from motfusion.data.speech import read_speech_data
from motfusion.errors import DataError
from motfusion.evaluation.speech import judge_scores
from motfusion.training.asr_judge import train_asr_judge
from motfusion.training.files import write_json

Resynthesis = Callable[[SpeechTokenizer, torch.Tensor], torch.Tensor]  # (codec, wave (S,)) -> wave (S',)


def val_audio(
    data_dir: str | Path, sample_rate: int, n: int | None = None
) -> tuple[list[str], list[torch.Tensor]]:
    """The texts and waveforms of the first `n` (default all) val utterances."""
    val = [u for u in read_speech_data(data_dir) if u.split == "val"][:n]
    if not val:
        raise DataError(f"{data_dir} has no val utterance to evaluate on")
    return [u.text for u in val], [read_wav(u.audio, sample_rate) for u in val]


def evaluate_judge(judge: AsrJudge, data_dir: str | Path, n: int | None = None) -> dict[str, float]:
    """The judge's WER and CER on the real audio of the val split."""
    texts, waves = val_audio(data_dir, judge.cfg.mel.sample_rate, n)
    return {**judge_scores(judge.transcribe(waves), texts), "n": len(texts)}


def make_judge(
    data_dir: str | Path,
    out: str | Path,
    cfg: AsrConfig,
    log: Callable[[str], None] = partial(print, flush=True),
) -> dict[str, float]:
    """Train the judge on DATA's train split into `out`, score it on DATA's real val audio into
    OUT/metrics.json (the floor its readings of decoded speech are compared with); -> those metrics."""
    metrics = evaluate_judge(train_asr_judge(data_dir, out, cfg, log), data_dir)
    write_json(Path(out) / "metrics.json", metrics)
    log(
        f"val, real audio ({metrics['n']} utterances): wer_judge {metrics['wer_judge']:.3f} | "
        f"cer_judge {metrics['cer_judge']:.3f} -> {Path(out) / 'metrics.json'}"
    )
    return metrics


def _mel_gl(tok: SpeechTokenizer, wave: torch.Tensor) -> torch.Tensor:
    """The real log-mel at the units' rate, interpolated and through Griffin-Lim as centroids are."""
    return MelVocoder(tok.cfg.mel)(tok.log_mel(wave))


def _fine_mel_gl(upsample: int, tok: SpeechTokenizer, wave: torch.Tensor) -> torch.Tensor:
    """The real log-mel at hop / upsample, through Griffin-Lim without interpolation."""
    mel = dataclasses.replace(tok.cfg.mel, hop=tok.cfg.mel.hop // upsample)
    return MelVocoder(mel, VocoderConfig(upsample=1))(LogMel(mel)(wave))


def resyntheses(tok: SpeechTokenizer) -> dict[str, Resynthesis]:
    """The rows of the table, for this codec (the decoder's only when it has one)."""
    upsample = tok.decoder.cfg.upsample if tok.decoder is not None else VocoderConfig().upsample
    rate = tok.cfg.mel.frame_rate
    rows: dict[str, Resynthesis] = {
        "original": lambda t, w: w,
        f"{rate:g} Hz log-mel + Griffin-Lim": _mel_gl,
        f"{rate * upsample:g} Hz log-mel + Griffin-Lim": partial(_fine_mel_gl, upsample),
        "units -> centroids + Griffin-Lim": lambda t, w: t.with_decoder(None).decode(t.encode(w)),
    }
    if tok.decoder is not None:
        rows["units -> decoder + Griffin-Lim"] = lambda t, w: t.decode(t.encode(w))
    return rows


def evaluate_codec(
    judge: AsrJudge,
    tok: SpeechTokenizer,
    data_dir: str | Path,
    n: int | None = None,
    log: Callable[[str], None] = partial(print, flush=True),
) -> dict[str, dict[str, float]]:
    """Row name -> the judge's WER and CER on the first `n` val utterances resynthesized that way."""
    texts, waves = val_audio(data_dir, tok.sample_rate, n)
    results = {}
    for name, resynthesize in resyntheses(tok).items():
        t0 = time.perf_counter()
        with torch.no_grad():
            audio = [resynthesize(tok, w) for w in waves]
        results[name] = {
            **judge_scores(judge.transcribe(audio), texts),
            "n": len(texts),
            "seconds": time.perf_counter() - t0,
        }
        log(f"{name}: wer_judge {results[name]['wer_judge']:.3f} cer_judge {results[name]['cer_judge']:.3f}")
    return results


def codec_table(results: dict[str, dict[str, float]]) -> str:
    """The results as a Markdown table."""
    lines = ["| audio the judge hears | wer_judge | cer_judge |", "|---|---|---|"]
    lines += [f"| {name} | {r['wer_judge']:.3f} | {r['cer_judge']:.3f} |" for name, r in results.items()]
    return "\n".join(lines)
