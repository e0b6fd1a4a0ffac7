"""Training the unit decoder of a speech codec (`motfusion train-unit-vocoder`, codecs/unit_decoder.py).

The train split's utterances are encoded to units by the codec and their log-mels taken at the
decoder's finer hop; both are laid end to end in one stream, and each step's batch is random crops
of `crop` units with their `upsample * crop` frames (a crop may span two utterances: the junction
is silence on both sides). The loss is the L1 distance in the codec's standardized log-mel space.
On the val split it reports the same distance for the centroids (the untrained decoder) and for
the trained decoder, then saves the decoder in the codec's directory, where SpeechTokenizer.load
finds it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from motfusion.codecs.audio import LogMel, read_wav
from motfusion.codecs.speech import DECODER_SUBDIR, SpeechTokenizer
from motfusion.codecs.unit_decoder import UnitDecoder, UnitDecoderConfig, save_unit_decoder
from motfusion.data.speech import read_speech_data
from motfusion.errors import ConfigError, DataError
from motfusion.training.logging import Tracker
from motfusion.training.loop import LoopConfig, train_loop


def unit_frame_pairs(
    tok: SpeechTokenizer, waves: list[torch.Tensor], r: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each wave -> its units (T,) and its standardized log-mel at hop / r, (r * T, n_mels): frame
    r * t is centred where unit t is (the last frames, past the audio, repeat its last frame)."""
    fine = LogMel(dataclasses.replace(tok.cfg.mel, hop=tok.cfg.mel.hop // r))
    pairs = []
    for wave in waves:
        units = tok.encode(wave)  # (T,)
        frames = (fine(wave).T - tok.mean) / tok.std  # (1 + S // (hop / r), n_mels)
        frames = torch.cat([frames, frames[-1:].expand(r * len(units), -1)])[: r * len(units)]
        pairs.append((units, frames))
    return pairs


def decoder_l1(decoder: UnitDecoder, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean |decoded - real| per frame and mel bin (standardized), over whole utterances."""
    with torch.no_grad():
        total = sum(float((decoder(u[None])[0].T - f).abs().sum()) for u, f in pairs)
    return total / sum(f.numel() for _, f in pairs)


def train_unit_vocoder(
    data_dir: str | Path,
    codec_dir: str | Path,
    out: str | Path | None,
    cfg: UnitDecoderConfig,
    log: Callable[[str], None] = partial(print, flush=True),
) -> tuple[UnitDecoder, dict[str, float]]:
    """Fit a decoder to the codec's units of DATA's train split; save it to `out` (default
    CODEC/decoder); -> the decoder and its val metrics."""
    tok = SpeechTokenizer.load(codec_dir).with_decoder(None)
    if tok.cfg.dedup:
        raise ConfigError(
            f"the speech codec at {codec_dir} collapses repeated units (dedup): no durations to decode"
        )
    cfg = dataclasses.replace(cfg, k=tok.cfg.k, n_mels=tok.cfg.mel.n_mels).validate()
    if tok.cfg.mel.hop % cfg.upsample:
        raise ConfigError(f"upsample={cfg.upsample} must divide the codec's mel hop {tok.cfg.mel.hop}")
    out = Path(out) if out is not None else Path(codec_dir) / DECODER_SUBDIR
    t0 = time.perf_counter()
    utterances = read_speech_data(data_dir)
    splits = {
        split: [read_wav(u.audio, tok.sample_rate) for u in utterances if u.split == split]
        for split in ("train", "val")
    }
    if not splits["train"]:
        raise DataError(f"{data_dir} has no train utterance to fit the unit decoder on")
    train, val = (unit_frame_pairs(tok, splits[s], cfg.upsample) for s in ("train", "val"))
    units = torch.cat([u for u, _ in train])  # (N,) the stream
    frames = torch.cat([f for _, f in train])  # (r * N, n_mels)
    log(f"{len(train)} train utterances, {len(units)} units in {time.perf_counter() - t0:.1f} s")

    torch.manual_seed(cfg.seed)
    model = UnitDecoder(cfg, tok.centroids).train()
    g = torch.Generator().manual_seed(cfg.seed)
    r, crop = cfg.upsample, min(cfg.crop, len(units))
    offsets = torch.arange(crop)

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        starts = torch.randint(0, len(units) - crop + 1, (cfg.batch_size,), generator=g)  # (B,)
        x = units[starts[:, None] + offsets]  # (B, crop)
        target = frames[r * starts[:, None] + torch.arange(r * crop)]  # (B, r * crop, n_mels)
        return F.l1_loss(model(x).transpose(1, 2), target), {}

    loop = LoopConfig(
        name="unit-vocoder",
        steps=cfg.steps,
        lr=cfg.lr,
        warmup=cfg.warmup,
        min_lr=cfg.lr / 20,
        grad_clip=1.0,
        log_every=cfg.log_every,
    )
    with Tracker(out, tracking=cfg, config=dataclasses.asdict(cfg)) as tracker:
        train_loop(model.parameters(), step_loss, loop, log, tracker.log)
    model.eval()
    pairs = val or train
    metrics = {
        "l1_centroids": decoder_l1(UnitDecoder(cfg, tok.centroids).eval(), pairs),
        "l1_decoder": decoder_l1(model, pairs),
        "split": "val" if val else "train",
        "train_seconds": time.perf_counter() - t0,
    }
    save_unit_decoder(model, out, tok.centroids, {"metrics": metrics, "data": str(Path(data_dir).resolve())})
    log(
        f"{metrics['split']}: L1 of standardized log-mel frames {metrics['l1_centroids']:.4f} from the "
        f"centroids -> {metrics['l1_decoder']:.4f} from the decoder ({len(pairs)} utterances) -> {out}"
    )
    return model, metrics
