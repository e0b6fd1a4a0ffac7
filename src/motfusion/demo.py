"""`motfusion demo`: train the default MoT-Transfusion model on shapes, evaluate it, write a report.

Running it again on the same directory continues an unfinished run from its last checkpoint, or
reuses a finished one, then evaluates again.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from motfusion.artifacts import kind_of
from motfusion.codecs.asr import DEFAULT_SUBDIR as JUDGE_SUBDIR
from motfusion.codecs.asr import KIND as JUDGE_KIND
from motfusion.codecs.asr import AsrConfig
from motfusion.codecs.audio import write_wav
from motfusion.codecs.speech import DECODER_SUBDIR, SpeechTokenizerConfig
from motfusion.codecs.speech import DEFAULT_SUBDIR as CODEC_SUBDIR
from motfusion.codecs.speech import KIND as CODEC_KIND
from motfusion.codecs.unit_decoder import KIND as DECODER_KIND
from motfusion.codecs.unit_decoder import UnitDecoderConfig
from motfusion.config import Config
from motfusion.data.edits import EDIT_DATASETS
from motfusion.data.espeak import make_speech_data, normalize
from motfusion.data.images import to_pil
from motfusion.data.shapes import render
from motfusion.data.speech import INFO
from motfusion.evaluation.asr_judge import make_judge
from motfusion.evaluation.shapes_suite import EditEval, evaluate_edits, evaluate_shapes
from motfusion.evaluation.speech import SpeechEval, evaluate_speech
from motfusion.report import (
    display_scale,
    loss_keys,
    plot_losses,
    read_metrics,
    sample_grid,
    smooth,
    write_html,
)
from motfusion.sampling import Generator, SampleConfig
from motfusion.sampling.load import default_device, load_generator
from motfusion.training.checkpoint import checkpoint_step, latest_checkpoint
from motfusion.training.speech_units import train_speech_tokenizer
from motfusion.training.trainer import train
from motfusion.training.unit_vocoder import train_unit_vocoder

GRID_PROMPTS = 12
GRID_SAMPLES = 6
# What a speech demo makes when its data directory is empty (docs/RESULTS.md, "speech-demo"):
SPEECH_UTTERANCES = 3000  # shapes captions spoken by espeak-ng: about 45 s, 163 of them held out
VOCODER_STEPS = 1000  # the unit decoder (codecs/unit_decoder.py)
JUDGE_STEPS = 800  # the ASR judge (codecs/asr.py), trained on the real audio of the train split


def prepare_speech(cfg: Config) -> None:
    """data.dataset=speech:DIR, made piece by piece where missing, each kept for the next run: the
    espeak-ng utterances of shapes captions, the unit codec (k = model.vocab_sizes["speech"]) with
    its decoder, and the ASR judge that reads the model's speech back. A tokenizer directory, or a
    dataset made beforehand, is used as it is."""
    name, _, arg = cfg.data.dataset.partition(":")
    data = Path(arg)
    if name != "speech" or kind_of(data) == CODEC_KIND:
        return
    codec = data / CODEC_SUBDIR
    if not (data / INFO).is_file():
        print(f"making the speech data in {data}: espeak-ng speaks {SPEECH_UTTERANCES} shapes captions")
        make_speech_data(data, n=SPEECH_UTTERANCES, sources=("shapes",))
    if kind_of(codec) != CODEC_KIND:
        train_speech_tokenizer(data, codec, SpeechTokenizerConfig(k=cfg.model.vocab_sizes.get("speech", 500)))
    if kind_of(codec / DECODER_SUBDIR) != DECODER_KIND:
        train_unit_vocoder(data, codec, None, UnitDecoderConfig(steps=VOCODER_STEPS))
    if kind_of(data / JUDGE_SUBDIR) != JUDGE_KIND:
        make_judge(data, data / JUDGE_SUBDIR, AsrConfig(steps=JUDGE_STEPS))


def run_demo(
    cfg: Config,
    out: Path,
    sample_cfg: SampleConfig,
    *,
    n_single: int = 48,
    n_prompts: int = 60,
    n_captions: int = 64,
    seed: int = 0,
) -> dict:
    """Train (or continue) `cfg` into `out`, evaluate, write out/report/; returns the report's metrics,
    or {"stopped_by": SIGNAL} when a signal stopped the training (it is checkpointed; rerun to go on)."""
    start = time.perf_counter()
    out = Path(out)
    prepare_speech(cfg)
    ckpt = latest_checkpoint(out)
    if ckpt is None or checkpoint_step(ckpt) < cfg.train.steps:
        result = train(cfg, out, resume=ckpt is not None)
        if result.stopped_by:  # Ctrl-C or a scheduler's stop: no evaluation of a half-trained model
            print(f"the demo stops before its evaluation; `motfusion demo --out {out}` continues it")
            return {"stopped_by": result.stopped_by}
    else:
        print(f"reusing the finished run in {out} ({ckpt.name}); delete it to train again")
    train_s = read_metrics(out / "metrics.jsonl")[-1]["elapsed_s"]

    print("evaluating: text to image on held-out prompts, image to text on held-out images ...")
    device = default_device()
    gen, cfg = load_generator(out, device, sample_cfg)
    ev = evaluate_shapes(gen, n_single=n_single, n_prompts=n_prompts, n_captions=n_captions, seed=seed)
    report = write_report(out, cfg, gen, ev, seed)
    edits = (
        evaluate_edits(gen, n=n_captions, seed=seed, layout=cfg.data.edit_layout)
        if cfg.data.dataset in EDIT_DATASETS
        else None
    )
    speech = (
        evaluate_speech(gen, cfg, n=n_captions, seed=seed) if cfg.data.dataset.startswith("speech:") else None
    )
    history = read_metrics(out / "metrics.jsonl")
    metrics = {
        **ev.metrics,
        **(edits.metrics if edits else {}),
        **(speech.metrics if speech else {}),
        **{f"final_{k}": smooth([r[k] for r in history if k in r])[-1] for k in loss_keys(history)},
        "steps": history[-1]["step"],
        "train_seconds": train_s,
        "wall_clock_seconds": time.perf_counter() - start,
        "params": gen.model.num_params(),
        "n_single": n_single,
        "n_prompts": n_prompts,
        "n_captions": n_captions,
        "untie": ",".join(cfg.model.untie) or "none",
        "weights": f"moving average (train.ema={cfg.train.ema})" if cfg.train.ema else "raw",
        "sampling": f"{gen.sampler_name} {gen.cfg.steps} steps, guidance {gen.cfg.guidance}"
        + (
            f" ({gen.cfg.guidance_early} over the first quarter)"
            if gen.cfg.guidance_early is not None
            else ""
        )
        + (f", best of {gen.cfg.best_of}" if gen.cfg.best_of > 1 else ""),
    }
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2))
    forms = {
        f"mixed prompts, form {k.split('/', 1)[1]}": v
        for k, v in ev.metrics.items()
        if k.startswith("geneval_form/")
    }
    forms = {"single-object prompts (geneval_single)": ev.metrics["geneval_single"], **forms}
    write_html(
        report,
        f"motfusion demo: {out}",
        metrics,
        *_html_rows(report, ev, cfg.data.image_size),
        forms=forms,
        edits=_edit_rows(report, edits, cfg.data.image_size) if edits else None,
        speech=_speech_rows(report, speech) if speech else None,
    )
    print(
        f"geneval (single object) {metrics['geneval_single']:.3f} | geneval (all forms) {metrics['geneval']:.3f} | "
        f"caption_accuracy {metrics['caption_accuracy']:.3f}"
        + (f" | edit_accuracy {metrics['edit_accuracy']:.3f}" if edits else "")
        + (_speech_summary(metrics) if speech else "")
        + f" | {metrics['wall_clock_seconds']:.0f} s"
    )
    print(f"report: {report / 'index.html'}")
    return metrics


def write_report(out: Path, cfg: Config, gen: Generator, ev, seed: int) -> Path:
    report = out / "report"
    (report / "images").mkdir(parents=True, exist_ok=True)
    history = read_metrics(out / "metrics.jsonl")
    plot_losses({out.name: history}, report / "loss.png", keys=loss_keys(history))
    prompts = (
        ev.prompts[: GRID_PROMPTS // 2] + ev.prompts[-GRID_PROMPTS // 2 :]
    )  # single-object and harder forms
    g = torch.Generator(device=gen.device).manual_seed(seed + 100)
    grid = [list(gen.decode_images(gen.images([p] * GRID_SAMPLES, g)).cpu()) for p in prompts]
    sample_grid(prompts, grid, report / "samples.png", scale=display_scale(cfg.data.image_size))
    return report


def _html_rows(report: Path, ev, image_size: int) -> tuple[list[dict], list[dict]]:
    scale = display_scale(image_size)
    t2i = []
    for i, (prompt, image, ok) in enumerate(zip(ev.prompts, ev.images, ev.prompt_ok)):
        name = f"images/t2i_{i:03d}.png"
        to_pil(image, scale).save(report / name)
        t2i.append({"prompt": prompt, "files": [name], "ok": ok})
    i2t = []
    for i, (image, truth, caption, ok) in enumerate(
        zip(ev.caption_images, ev.truths, ev.captions, ev.caption_ok)
    ):
        name = f"images/i2t_{i:03d}.png"
        to_pil(image, scale).save(report / name)
        i2t.append({"file": name, "truth": truth, "caption": caption, "ok": ok})
    return t2i, i2t


def _edit_rows(report: Path, ev: EditEval, image_size: int) -> list[dict]:
    """Each held-out edit's source, output and target as files, and edits.png: the first GRID_PROMPTS."""
    scale = display_scale(image_size)
    rows, grid = [], []
    for i, (edit, source, output, ok) in enumerate(zip(ev.edits, ev.sources, ev.outputs, ev.ok)):
        pictures = (source, output, render(edit.target))
        names = [f"images/edit_{i:03d}_{part}.png" for part in ("source", "output", "target")]
        for name, picture in zip(names, pictures):
            to_pil(picture, scale).save(report / name)
        rows.append({"instruction": edit.instruction, "files": names, "ok": ok})
        grid.append(list(pictures))
    n = min(GRID_PROMPTS, len(rows))
    sample_grid([r["instruction"] for r in rows[:n]], grid[:n], report / "edits.png", scale=scale)
    return rows


def _speech_summary(metrics: dict) -> str:
    judge = metrics.get("speech_tts_wer_judge")
    return f" | speech-to-text CER {metrics['speech_cer']:.3f}" + (
        f" | text-to-speech WER (judge) {judge:.3f}" if judge is not None else ""
    )


def _speech_rows(report: Path, ev: SpeechEval) -> dict[str, list[dict]]:
    """Audio files for the page: each prompt's spoken answer (tts) and each held-out recording (stt)."""
    (report / "audio").mkdir(exist_ok=True)
    tts, stt = [], []
    for i, text in enumerate(ev.texts):
        if ev.waves is not None:
            name = f"audio/tts_{i:03d}.wav"
            write_wav(report / name, ev.waves[i], ev.sample_rate)
            heard = ev.heard[i]
            tts.append({"prompt": text, "file": name, "heard": heard, "ok": normalize(heard) == text})
        name = f"audio/stt_{i:03d}{ev.audio[i].suffix}"
        shutil.copyfile(ev.audio[i], report / name)
        transcript = ev.transcripts[i]
        stt.append(
            {"file": name, "truth": text, "transcript": transcript, "ok": normalize(transcript) == text}
        )
    return {"tts": tts, "stt": stt}
