"""The commands that make what a run needs besides the model: speech data and its unit codec, the
VAE and the VQ-VAE image codecs, and the judge models of evaluation (classifier, CLIP)."""

from __future__ import annotations

import argparse
from pathlib import Path

from motfusion.cli.common import Command, csv
from motfusion.codecs.speech import SpeechTokenizerConfig
from motfusion.codecs.vae import VAEConfig
from motfusion.codecs.vq import CONFIG, METRICS, WEIGHTS, VQConfig
from motfusion.config import Config
from motfusion.data.espeak import SOURCES, VOICES, make_speech_data
from motfusion.data.fashion import FASHION_DIR
from motfusion.data.pipeline import build_dataset
from motfusion.errors import ConfigError
from motfusion.evaluation.classifier import ClassifierConfig, fit_fashion_classifier
from motfusion.evaluation.clip import ClipConfig, fit_clip
from motfusion.training.speech_units import train_speech_tokenizer
from motfusion.training.vae import train_vae
from motfusion.training.vq import VQTrainConfig, train_vq


def speech_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="dataset directory: wav/, manifest.jsonl, dataset.json")
    p.add_argument("--n", type=int, default=2000, help="number of utterances")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated text sources from {', '.join(SOURCES)}")
    p.add_argument("--voices", default=",".join(VOICES), help="comma-separated espeak-ng voices (variants: en+f3)")
    p.add_argument("--max-chars", type=int, default=48, help="longest sentence, in characters")
    p.add_argument("--val-percent", type=int, default=5, help="share of sentences held out for val (by a hash of the text)")
    p.add_argument("--seed", type=int, default=0)


def run_speech_data(args: argparse.Namespace) -> None:
    make_speech_data(args.out, n=args.n, sources=tuple(csv(args.sources)), voices=tuple(csv(args.voices)),
                     max_chars=args.max_chars, val_percent=args.val_percent, seed=args.seed)


def speech_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    d = SpeechTokenizerConfig()
    p.add_argument("--data", required=True, type=Path, help="a directory written by make-speech-data")
    p.add_argument("--out", type=Path, help="tokenizer directory (default: DATA/tokenizer)")
    p.add_argument("--k", type=int, default=d.k, help="vocabulary size (k-means clusters)")
    p.add_argument("--iters", type=int, default=d.iters, help="Lloyd iterations (at most)")
    p.add_argument("--max-frames", type=int, default=d.max_frames, help="frames sampled to fit k-means on")
    p.add_argument("--dedup", action="store_true", help="collapse repeated units (shorter sequences, durations lost)")
    p.add_argument("--seed", type=int, default=d.seed)


def run_speech_tokenizer(args: argparse.Namespace) -> None:
    if args.k < 2 or args.iters < 0 or args.max_frames < args.k:
        raise ConfigError("--k must be >= 2, --iters >= 0 and --max-frames >= --k")
    cfg = SpeechTokenizerConfig(k=args.k, iters=args.iters, max_frames=args.max_frames, seed=args.seed, dedup=args.dedup)
    train_speech_tokenizer(args.data, args.out, cfg)


def vae_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, metavar="NAME", help="a registered image dataset, e.g. shapes or fashion")
    p.add_argument("--out", required=True, type=Path, help="directory for config.json, model.safetensors, metrics.jsonl")
    p.add_argument("--steps", type=int, help="shorthand for steps=N")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="VAE config fields, e.g. image_size=32 downsample=8 latent_channels=8 kl_weight=1e-6 attention=true")


def run_vae(args: argparse.Namespace) -> None:
    overrides = [f"dataset={args.dataset}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    train_vae(VAEConfig().override(overrides), args.out)


def vq_arguments(p: argparse.ArgumentParser) -> None:
    d, t = VQConfig(), VQTrainConfig()
    p.add_argument("--dataset", default=t.dataset, help="a data.dataset name (NAME or NAME:ARG); its images train the VQ")
    p.add_argument("--out", required=True, type=Path, help=f"directory for {WEIGHTS}, {CONFIG} and {METRICS}")
    p.add_argument("--steps", type=int, default=t.steps)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--codebook-size", type=int, default=d.codebook_size, help="vocabulary of image codes")
    p.add_argument("--image-size", type=int, default=d.image_size, help="pixels; must equal data.image_size of the runs")
    p.add_argument("--downsample", type=int, default=d.downsample, help="pixels per code side: 32px / 4 = 8x8 codes")
    p.add_argument("--channels", type=int, default=d.channels, help="width of the encoder and decoder")
    p.add_argument("--seed", type=int, default=t.seed)


def run_vq(args: argparse.Namespace) -> None:
    cfg = VQConfig(codebook_size=args.codebook_size, image_size=args.image_size, downsample=args.downsample,
                   channels=args.channels)
    tcfg = VQTrainConfig(dataset=args.dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    train_vq(cfg, tcfg, args.out)


def classifier_arguments(p: argparse.ArgumentParser) -> None:
    d = ClassifierConfig()
    p.add_argument("--out", required=True, type=Path, help="directory for classifier.safetensors and classifier.json")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--data", type=Path, default=FASHION_DIR, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--seed", type=int, default=d.seed)


def run_classifier(args: argparse.Namespace) -> None:
    cfg = ClassifierConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    fit_fashion_classifier(cfg, args.out, root=args.data)


def clip_arguments(p: argparse.ArgumentParser) -> None:
    d = ClipConfig()
    p.add_argument("--dataset", required=True, help="as data.dataset: fashion, emoji, fashion:PATH, ...")
    p.add_argument("--out", required=True, type=Path, help="directory for clip.safetensors and clip.json")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--image-size", type=int, default=d.input_size, help="as data.image_size")
    p.add_argument("--seed", type=int, default=d.seed)


def run_clip(args: argparse.Namespace) -> None:
    # Only the data section matters here; patch size 1 accepts any image size.
    data_cfg = Config().override([f"data.dataset={args.dataset}", f"data.image_size={args.image_size}", "model.patch_size=1"])
    cfg = ClipConfig(steps=args.steps, batch_size=args.batch_size, input_size=args.image_size, seed=args.seed)
    fit_clip(cfg, build_dataset(data_cfg, "train"), build_dataset(data_cfg, "val"), args.out,
             {"dataset": args.dataset, "image_size": args.image_size})


COMMANDS = {
    "make-speech-data": Command("write a paired text-speech dataset spoken by espeak-ng", speech_data_arguments,
                                run_speech_data),
    "train-speech-tokenizer": Command("fit k-means speech units on a speech dataset and cache its units",
                                      speech_tokenizer_arguments, run_speech_tokenizer),
    "train-vae": Command("train the small KL-VAE on an image dataset, for data.image_repr=latents", vae_arguments,
                         run_vae),
    "train-vq": Command("train the VQ-VAE image tokenizer on an image dataset, for data.image_repr=tokens",
                        vq_arguments, run_vq),
    "train-classifier": Command("train the Fashion-MNIST CNN behind fid_fashion_classifier and class_accuracy",
                                classifier_arguments, run_classifier),
    "train-clip": Command("train the small CLIP behind clip_score_motfusion on a dataset", clip_arguments, run_clip),
}
