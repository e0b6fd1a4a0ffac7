"""The commands that make what a run needs besides the model: speech data and its unit codec (with
its trained decoder), the VAE and the VQ-VAE image codecs, and the judge models of evaluation
(classifier, CLIP, the speech recogniser); and `eval-speech-codec`, which has the speech judge
score the unit codec alone.

Each `train-*` command writes one artifact directory (`--out DIR`, see artifacts.py) and takes
`key=value` overrides of that artifact's config dataclass, parsed like a run's config; a few
frequent keys also have a flag (`--steps 200` is `steps=200`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from motfusion.cli.common import Command, csv
from motfusion.codecs.asr import DEFAULT_SUBDIR as JUDGE_SUBDIR
from motfusion.codecs.asr import AsrConfig, load_judge
from motfusion.codecs.speech import DEFAULT_SUBDIR as CODEC_SUBDIR
from motfusion.codecs.speech import SpeechTokenizer, SpeechTokenizerConfig
from motfusion.codecs.unit_decoder import UnitDecoderConfig
from motfusion.codecs.vae import VAEConfig
from motfusion.codecs.vq import VQConfig
from motfusion.config import apply_overrides
from motfusion.data.espeak import SOURCES, VOICES, make_speech_data
from motfusion.data.fashion import FASHION_DIR
from motfusion.data.pipeline import image_dataset
from motfusion.errors import ConfigError
from motfusion.evaluation.asr_judge import codec_table, evaluate_codec, make_judge
from motfusion.evaluation.classifier import ClassifierConfig, fit_fashion_classifier
from motfusion.evaluation.clip import ClipConfig, fit_clip
from motfusion.training.files import check_writable_file, write_json
from motfusion.training.speech_units import train_speech_tokenizer
from motfusion.training.unit_vocoder import train_unit_vocoder
from motfusion.training.vae import train_vae
from motfusion.training.vq import train_vq


@dataclass(frozen=True)
class Flag:
    """A shorthand flag for one config key: `--batch-size 8` is `batch_size=8`."""

    flag: str
    key: str
    type: type = int  # bool: a switch that sets the key to true
    help: str = ""


def artifact_arguments(
    p: argparse.ArgumentParser, config: type, flags: list[Flag], out_help: str, out_required: bool = True
) -> None:
    """--out DIR, the shorthand flags, and trailing key=value overrides of the `config` dataclass."""
    p.add_argument("--out", required=out_required, type=Path, help=out_help)
    for f in flags:
        value = "true" if f.type is bool else "VALUE"
        text = f"{f.help} ({f.key}={value})" if f.help else f"shorthand for {f.key}={value}"
        if f.type is bool:
            p.add_argument(f.flag, dest=f.key, action="store_const", const="true", help=text)
        else:
            p.add_argument(f.flag, dest=f.key, type=f.type, help=text)
    keys = ", ".join(f.name for f in dataclasses.fields(config))
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"{config.__name__} fields: {keys}")


def config_from(args: argparse.Namespace, cfg: Any, flags: list[Flag]) -> Any:
    """`cfg` with the key=value overrides, then the flags given, applied; validated."""
    given = [f"{f.key}={getattr(args, f.key)}" for f in flags if getattr(args, f.key) is not None]
    return apply_overrides(cfg, [*args.overrides, *given]).validate()


def speech_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", required=True, type=Path, help="dataset directory: wav/, manifest.jsonl, dataset.json"
    )
    p.add_argument("--n", type=int, default=2000, help="number of utterances")
    p.add_argument(
        "--sources", default=",".join(SOURCES), help=f"comma-separated text sources from {', '.join(SOURCES)}"
    )
    p.add_argument(
        "--voices", default=",".join(VOICES), help="comma-separated espeak-ng voices (variants: en+f3)"
    )
    p.add_argument("--max-chars", type=int, default=48, help="longest sentence, in characters")
    p.add_argument(
        "--val-percent",
        type=int,
        default=5,
        help="share of sentences held out for val (by a hash of the text)",
    )
    p.add_argument("--seed", type=int, default=0)


def run_speech_data(args: argparse.Namespace) -> None:
    make_speech_data(
        args.out,
        n=args.n,
        sources=tuple(csv(args.sources)),
        voices=tuple(csv(args.voices)),
        max_chars=args.max_chars,
        val_percent=args.val_percent,
        seed=args.seed,
    )


SPEECH_FLAGS = [
    Flag("--k", "k", help="vocabulary size (k-means clusters)"),
    Flag("--iters", "iters", help="Lloyd iterations (at most)"),
    Flag("--max-frames", "max_frames", help="frames sampled to fit k-means on"),
    Flag("--dedup", "dedup", bool, "collapse repeated units (shorter sequences, durations lost)"),
    Flag("--seed", "seed"),
]


# The trainers of training/loop.py without flags of their own (the classifier, the judge, the decoder).
LOOP_FLAGS = [Flag("--steps", "steps"), Flag("--batch-size", "batch_size"), Flag("--seed", "seed")]


def speech_dir_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="a directory written by make-speech-data")


def speech_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    speech_dir_argument(p)
    artifact_arguments(
        p,
        SpeechTokenizerConfig,
        SPEECH_FLAGS,
        "tokenizer directory (default: DATA/tokenizer)",
        out_required=False,
    )


def run_speech_tokenizer(args: argparse.Namespace) -> None:
    train_speech_tokenizer(args.data, args.out, config_from(args, SpeechTokenizerConfig(), SPEECH_FLAGS))


def data_and_codec_arguments(p: argparse.ArgumentParser) -> None:
    speech_dir_argument(p)
    p.add_argument("--codec", type=Path, help="the speech tokenizer's directory (default: DATA/tokenizer)")


def unit_vocoder_arguments(p: argparse.ArgumentParser) -> None:
    data_and_codec_arguments(p)
    artifact_arguments(
        p,
        UnitDecoderConfig,
        LOOP_FLAGS,
        "decoder directory (default: CODEC/decoder, where the codec loads it from)",
        out_required=False,
    )


def run_unit_vocoder(args: argparse.Namespace) -> None:
    codec = args.codec or args.data / CODEC_SUBDIR
    train_unit_vocoder(args.data, codec, args.out, config_from(args, UnitDecoderConfig(), LOOP_FLAGS))


def asr_judge_arguments(p: argparse.ArgumentParser) -> None:
    speech_dir_argument(p)
    artifact_arguments(
        p,
        AsrConfig,
        LOOP_FLAGS,
        "judge directory, with metrics.json (default: DATA/asr-judge, where eval --suite speech finds it)",
        out_required=False,
    )


def run_asr_judge(args: argparse.Namespace) -> None:
    make_judge(args.data, args.out or args.data / JUDGE_SUBDIR, config_from(args, AsrConfig(), LOOP_FLAGS))


def codec_eval_arguments(p: argparse.ArgumentParser) -> None:
    data_and_codec_arguments(p)
    p.add_argument("--judge", type=Path, help="a train-asr-judge directory (default: DATA/asr-judge)")
    p.add_argument(
        "--n", type=int, default=100, help="val utterances (Griffin-Lim takes ~0.4 s each per row)"
    )
    p.add_argument("--out", type=Path, help="JSON file for the table (default: CODEC/eval_codec.json)")


def run_codec_eval(args: argparse.Namespace) -> None:
    if args.n <= 0:
        raise ConfigError(f"--n={args.n} must be positive")
    codec = args.codec or args.data / CODEC_SUBDIR
    out = args.out or codec / "eval_codec.json"
    check_writable_file(out, "--out")
    judge, tok = load_judge(args.judge or args.data / JUDGE_SUBDIR), SpeechTokenizer.load(codec)
    results = evaluate_codec(judge, tok, args.data, args.n)
    write_json(out, results)
    print(codec_table(results))
    print(f"wrote {out}")


VAE_FLAGS = [
    Flag("--dataset", "dataset", str, "a registered image dataset, e.g. shapes or fashion"),
    Flag("--steps", "steps"),
]


def vae_arguments(p: argparse.ArgumentParser) -> None:
    artifact_arguments(
        p, VAEConfig, VAE_FLAGS, "directory for the VAE (weights.safetensors, config.json) and metrics.jsonl"
    )


def run_vae(args: argparse.Namespace) -> None:
    train_vae(config_from(args, VAEConfig(), VAE_FLAGS), args.out)


VQ_FLAGS = [
    Flag("--dataset", "dataset", str, "a data.dataset name (NAME or NAME:ARG); its images train the VQ"),
    Flag("--steps", "steps"),
    Flag("--batch-size", "batch_size"),
    Flag("--lr", "lr", float),
    Flag("--codebook-size", "codebook_size", help="vocabulary of image codes"),
    Flag("--image-size", "image_size", help="pixels; must equal data.image_size of the runs"),
    Flag("--downsample", "downsample", help="pixels per code side: 32px / 4 = 8x8 codes"),
    Flag("--channels", "channels", help="width of the encoder and decoder"),
    Flag("--seed", "seed"),
]


def vq_arguments(p: argparse.ArgumentParser) -> None:
    artifact_arguments(
        p, VQConfig, VQ_FLAGS, "directory for the VQ-VAE (weights.safetensors, config.json) and metrics.json"
    )


def run_vq(args: argparse.Namespace) -> None:
    train_vq(config_from(args, VQConfig(), VQ_FLAGS), args.out)


def classifier_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=FASHION_DIR, help="folder with the Fashion-MNIST IDX files")
    artifact_arguments(
        p,
        ClassifierConfig,
        LOOP_FLAGS,
        "directory for the classifier (weights.safetensors, config.json)",
    )


def run_classifier(args: argparse.Namespace) -> None:
    fit_fashion_classifier(config_from(args, ClassifierConfig(), LOOP_FLAGS), args.out, root=args.data)


CLIP_FLAGS = [
    Flag("--dataset", "dataset", str, "as data.dataset: fashion, emoji, fashion:PATH, ..."),
    Flag("--steps", "steps"),
    Flag("--batch-size", "batch_size"),
    Flag("--image-size", "input_size", help="as data.image_size (input_size=N)"),
    Flag("--seed", "seed"),
]


def clip_arguments(p: argparse.ArgumentParser) -> None:
    artifact_arguments(
        p, ClipConfig, CLIP_FLAGS, "directory for the CLIP model (weights.safetensors, config.json)"
    )


def run_clip(args: argparse.Namespace) -> None:
    cfg = config_from(args, ClipConfig(), CLIP_FLAGS)
    train_set, val_set = (image_dataset(cfg.dataset, cfg.input_size, split) for split in ("train", "val"))
    fit_clip(cfg, train_set, val_set, args.out)


COMMANDS = {
    "make-speech-data": Command(speech_data_arguments, run_speech_data),
    "train-speech-tokenizer": Command(speech_tokenizer_arguments, run_speech_tokenizer),
    "train-unit-vocoder": Command(unit_vocoder_arguments, run_unit_vocoder),
    "train-asr-judge": Command(asr_judge_arguments, run_asr_judge),
    "eval-speech-codec": Command(codec_eval_arguments, run_codec_eval),
    "train-vae": Command(vae_arguments, run_vae),
    "train-vq": Command(vq_arguments, run_vq),
    "train-classifier": Command(classifier_arguments, run_classifier),
    "train-clip": Command(clip_arguments, run_clip),
}
