"""Training the CTC judge on a speech dataset's real audio (`motfusion train-asr-judge`,
codecs/asr.py). evaluation/asr_judge.py scores it: its word error rate on the val split's audio.

Every train utterance's features are computed once and kept in memory. A step takes `batch_size`
utterances of about the same length (a random run of neighbours in length order: little padding),
pads them, masks a few stretches of time and of mel bins in each
(SpecAugment: the judge must not lean on any one moment or band) and takes the CTC loss. The
artifact records the val split's CTC loss; the word and character error rates need the metrics of
the evaluation layer, which `motfusion train-asr-judge` adds to OUT/metrics.json.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from motfusion.codecs.asr import AsrConfig, AsrJudge, save_judge, text_labels
from motfusion.codecs.audio import read_wav
from motfusion.data.speech import read_speech_data
from motfusion.errors import DataError
from motfusion.training.logging import Tracker
from motfusion.training.loop import LoopConfig, train_loop

Example = tuple[torch.Tensor, torch.Tensor]  # features (T, n_mels), labels (L,)


def examples(judge: AsrJudge, data_dir: Path, split: str) -> list[Example]:
    """The features and CTC labels of every `split` utterance whose audio is long enough for CTC
    (at least one output frame per label)."""
    out = []
    for u in read_speech_data(data_dir):
        if u.split == split:
            feats = judge.features(read_wav(u.audio, judge.cfg.mel.sample_rate))
            labels = torch.tensor(text_labels(u.text))
            if int(judge.out_lengths(torch.tensor(len(feats)))) >= len(labels):
                out.append((feats, labels))
    return out


def spans(lengths: torch.Tensor, size: int, n: int, total: int, g: torch.Generator) -> torch.Tensor:
    """(B,) lengths -> (B, total) bool, True inside `n` random spans of up to `size` positions that
    start below each row's length."""
    hit = torch.zeros(len(lengths), total, dtype=torch.bool)
    pos = torch.arange(total)
    for _ in range(n):
        width = torch.randint(0, size + 1, (len(lengths),), generator=g)  # (B,)
        start = (torch.rand(len(lengths), generator=g) * (lengths - width).clamp(min=0)).long()  # (B,)
        hit |= (pos >= start[:, None]) & (pos < (start + width)[:, None])
    return hit


def spec_augment(x: torch.Tensor, lengths: torch.Tensor, cfg: AsrConfig, g: torch.Generator) -> torch.Tensor:
    """SpecAugment: x (B, T, n_mels) with `time_masks` spans of up to `time_mask` frames and
    `freq_masks` bands of up to `freq_mask` bins per row set to 0 (the features' mean)."""
    B, T, M = x.shape
    time = spans(lengths, cfg.time_mask, cfg.time_masks, T, g)  # (B, T)
    freq = spans(torch.full((B,), M), cfg.freq_mask, cfg.freq_masks, M, g)  # (B, M)
    return x.masked_fill(time[:, :, None] | freq[:, None, :], 0.0)


def batch_of(items: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> padded features (B, T, n_mels), their lengths (B,), concatenated labels, label lengths (B,)."""
    feats, labels = zip(*items)
    return (
        pad_sequence(list(feats), batch_first=True),
        torch.tensor([len(f) for f in feats]),
        torch.cat(labels),
        torch.tensor([len(y) for y in labels]),
    )


def ctc_loss(judge: AsrJudge, items: list[Example], augment: Callable | None = None) -> torch.Tensor:
    x, lengths, labels, label_lengths = batch_of(items)
    if augment is not None:
        x = augment(x, lengths)
    logits, out_len = judge(x, lengths)  # (B, T', V)
    log_probs = logits.log_softmax(-1).transpose(0, 1)  # (T', B, V), as F.ctc_loss wants
    return F.ctc_loss(log_probs, labels, out_len, label_lengths, zero_infinity=True)


@torch.no_grad()
def val_loss(judge: AsrJudge, items: list[Example], batch_size: int) -> float:
    judge.eval()
    losses = [float(ctc_loss(judge, items[i : i + batch_size])) for i in range(0, len(items), batch_size)]
    judge.train()
    return sum(losses) / max(1, len(losses))


def train_asr_judge(
    data_dir: str | Path,
    out: str | Path,
    cfg: AsrConfig,
    log: Callable[[str], None] = partial(print, flush=True),
) -> AsrJudge:
    """Train on DATA's train split, save into `out` with the val split's CTC loss; -> the judge."""
    cfg.validate()
    data_dir, out = Path(data_dir), Path(out)
    torch.manual_seed(cfg.seed)
    judge = AsrJudge(cfg).train()
    t0 = time.perf_counter()
    train, val = examples(judge, data_dir, "train"), examples(judge, data_dir, "val")
    if not train:
        raise DataError(f"{data_dir} has no train utterance to fit the judge on")
    seconds = sum(len(f) for f, _ in train) / cfg.mel.frame_rate
    log(
        f"{len(train)} train utterances ({seconds:.0f} s), {len(val)} val, "
        f"features in {time.perf_counter() - t0:.1f} s"
    )
    g = torch.Generator().manual_seed(cfg.seed)
    augment = partial(spec_augment, cfg=cfg, g=g)

    by_length = sorted(train, key=lambda item: len(item[0]))

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        start = int(torch.randint(0, max(1, len(train) - cfg.batch_size + 1), (), generator=g))
        return ctc_loss(judge, by_length[start : start + cfg.batch_size], augment), {}

    loop = LoopConfig(
        name="asr-judge",
        steps=cfg.steps,
        lr=cfg.lr,
        warmup=cfg.warmup,
        min_lr=cfg.lr / 20,
        weight_decay=cfg.weight_decay,
        grad_clip=1.0,
        log_every=cfg.log_every,
    )
    with Tracker(out, tracking=cfg, config=dataclasses.asdict(cfg)) as tracker:
        train_loop(judge.parameters(), step_loss, loop, log, tracker.log)
    info = {
        "val_ctc_loss": val_loss(judge, val, cfg.batch_size) if val else None,
        "train_seconds": time.perf_counter() - t0,
        "data": str(data_dir.resolve()),
    }
    save_judge(judge, out, info)
    loss = info["val_ctc_loss"]
    log(f"val CTC loss {'-' if loss is None else f'{loss:.4f}'} ({len(val)} utterances) -> {out}")
    return judge.eval()
