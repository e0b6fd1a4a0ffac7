"""`motfusion generate`: text to image, image to text, interleaved, text to speech, speech to text."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from motfusion.cli.common import (
    Command,
    add_ckpt_argument,
    add_sample_arguments,
    default_device,
    sample_config,
    slug,
)
from motfusion.codecs.audio import write_wav
from motfusion.codecs.speech import speech_tokenizer_of
from motfusion.config import Config
from motfusion.data.images import to_pil
from motfusion.data.scan import ImageRules, read_image
from motfusion.errors import ConfigError
from motfusion.sampling import Generator
from motfusion.sampling.load import load_generator
from motfusion.sampling.speech import speech_to_text, text_to_units
from motfusion.sequence import Image, Units
from motfusion.training.checkpoint import check_writable_dir


def generate_arguments(p: argparse.ArgumentParser) -> None:
    add_ckpt_argument(p)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", action="append", help="text to image (repeat for a batch)")
    mode.add_argument("--image", action="append", type=Path, help="image to text: a PNG/JPEG (repeat for a batch)")
    mode.add_argument("--interleaved", metavar="PROMPT", help="free-running text that may open images")
    mode.add_argument("--speak", metavar="TEXT", help="text to speech (speech runs): writes a WAV")
    mode.add_argument("--transcribe", action="append", type=Path, metavar="WAV", help="speech to text (repeat for a batch)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--out", type=Path, default=Path("samples"), help="where PNG files go (--speak: a .wav file or a folder)")
    add_sample_arguments(p)


def run_generate(args: argparse.Namespace) -> None:
    if args.n <= 0:
        raise ConfigError(f"--n={args.n}: samples per prompt must be positive")
    samples = sample_config(args)
    if args.speak is not None:  # where the output goes is checked before any work
        check_writable_dir(args.out.parent if args.out.suffix.lower() == ".wav" else args.out, "--out")
    elif args.prompt or args.interleaved is not None:
        check_writable_dir(args.out, "--out")
    device = default_device()
    gen, cfg = load_generator(args.ckpt, device, samples, ema=not args.raw_weights)
    g = torch.Generator(device=device).manual_seed(args.seed)
    if args.speak is not None or args.transcribe:
        return _speech(args, gen, cfg, g)
    if args.image:
        d = cfg.data
        rules = ImageRules(size=d.image_size, min_side=1, max_pixels=d.max_image_pixels)  # any size is resized
        images = torch.stack([read_image(p, rules) for p in args.image]).to(device)
        for path, caption in zip(args.image, gen.captions(images, g)):
            print(f"{path}\t{caption}")
        return
    if args.interleaved is not None:
        return _interleaved(args, gen, g)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    for i, (prompt, image) in enumerate(zip(prompts, gen.decode_images(gen.images(prompts, g)))):
        path = args.out / f"{i:03d}_{slug(prompt)}.png"
        to_pil(image).save(path)
        print(path)


def _interleaved(args: argparse.Namespace, gen: Generator, g: torch.Generator) -> None:
    for i, seg in enumerate(gen.interleaved(args.interleaved, g)):
        if isinstance(seg, Image):
            path = args.out / f"interleaved_{i:02d}.png"
            to_pil(gen.decode_images(seg.pixels[None])[0]).save(path)
            print(f"[image: {path}]")
        elif isinstance(seg, Units):
            print(f"[{seg.modality}: {len(seg.ids)} units]")
        else:
            print(seg.text)


def _speech(args: argparse.Namespace, gen: Generator, cfg: Config, g: torch.Generator) -> None:
    stok = speech_tokenizer_of(cfg)
    if args.transcribe:
        units = [stok.encode_file(path) for path in args.transcribe]
        for path, text in zip(args.transcribe, speech_to_text(gen, units, g)):
            print(f"{path}\t{text}")
        return
    units = text_to_units(gen, stok, [args.speak], g)[0]
    path = args.out if args.out.suffix.lower() == ".wav" else args.out / f"{slug(args.speak)}.wav"
    write_wav(path, stok.decode(units), stok.sample_rate)
    print(f"{path}\t{len(units)} units, {len(units) / stok.cfg.mel.frame_rate:.2f} s")


COMMANDS = {
    "generate": Command("sample from a checkpoint: text to image, image to text, interleaved, or speech",
                        generate_arguments, run_generate),
}
