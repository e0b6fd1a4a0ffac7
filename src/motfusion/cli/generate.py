"""`motfusion generate`: text to image, image to text, interleaved, text to speech, speech to text."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image as PILImage

from motfusion.cli.common import (
    Command,
    add_ckpt_argument,
    add_device_argument,
    add_sample_arguments,
    device_of,
    sample_config,
    slug,
)
from motfusion.codecs.audio import write_wav
from motfusion.errors import ConfigError
from motfusion.pipeline import MotFusion
from motfusion.sequence import Units
from motfusion.training.files import check_writable_dir


def generate_arguments(p: argparse.ArgumentParser) -> None:
    add_ckpt_argument(p)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", action="append", help="text to image (repeat for a batch)")
    mode.add_argument(
        "--image", action="append", type=Path, help="image to text: a PNG/JPEG (repeat for a batch)"
    )
    mode.add_argument("--interleaved", metavar="PROMPT", help="free-running text that may open images")
    mode.add_argument("--speak", metavar="TEXT", help="text to speech (speech runs): writes a WAV")
    mode.add_argument(
        "--transcribe", action="append", type=Path, metavar="WAV", help="speech to text (repeat for a batch)"
    )
    p.add_argument(
        "--edit",
        type=Path,
        metavar="IMG",
        help="image editing: edit this PNG/JPEG by each --prompt instruction",
    )
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=32, help="images generated (or captioned) at a time")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("samples"),
        help="where PNG files go (--speak: a .wav file or a folder)",
    )
    add_device_argument(p)
    add_sample_arguments(p)


def run_generate(args: argparse.Namespace) -> None:
    """Every mode is a MotFusion verb (pipeline.py), so the CLI and the Python API give the same outputs."""
    if args.n <= 0 or args.batch_size <= 0:
        raise ConfigError(f"--n={args.n} and --batch-size={args.batch_size} must be positive")
    samples = sample_config(args)
    if args.edit is not None and not args.prompt:
        raise ConfigError(
            "--edit IMG needs the instruction as --prompt, e.g. --prompt 'make the red circle blue'"
        )
    if args.speak is not None:  # where the output goes is checked before any work
        check_writable_dir(args.out.parent if args.out.suffix.lower() == ".wav" else args.out, "--out")
    elif args.prompt or args.interleaved is not None:
        check_writable_dir(args.out, "--out")
    m = MotFusion.load(args.ckpt, device_of(args), ema=not args.raw_weights, sample=samples)
    if args.image:
        for path, caption in zip(args.image, m.caption(args.image, args.seed, args.batch_size)):
            print(f"{path}\t{caption}")
    elif args.transcribe:
        for path, text in zip(args.transcribe, m.transcribe(args.transcribe, args.seed)):
            print(f"{path}\t{text}")
    elif args.speak is not None:
        wave, rate = m.speak(args.speak, args.seed)
        path = args.out if args.out.suffix.lower() == ".wav" else args.out / f"{slug(args.speak)}.wav"
        write_wav(path, wave, rate)
        print(f"{path}\t{wave.numel() / rate:.2f} s")
    elif args.interleaved is not None:
        _interleaved(m.interleaved(args.interleaved, args.seed), args.out)
    else:
        prompts = [p for p in args.prompt for _ in range(args.n)]
        if args.edit is not None:
            pictures = m.edit(args.edit, prompts, seed=args.seed, batch_size=args.batch_size)
        else:
            pictures = m.generate_images(args.prompt, n=args.n, seed=args.seed, batch_size=args.batch_size)
        for i, (prompt, pic) in enumerate(zip(prompts, pictures)):
            path = args.out / f"{i:03d}_{slug(prompt)}.png"
            upscale(pic).save(path)
            print(path)


def _interleaved(segments: list, out: Path) -> None:
    for i, seg in enumerate(segments):
        if isinstance(seg, PILImage.Image):
            path = out / f"interleaved_{i:02d}.png"
            upscale(seg).save(path)
            print(f"[image: {path}]")
        elif isinstance(seg, Units):
            print(f"[{seg.modality}: {len(seg.ids)} units]")
        else:
            print(seg)


def upscale(pic: PILImage.Image, scale: int = 4) -> PILImage.Image:
    """A small generated picture, nearest-neighbour upscaled so its pixels stay crisp in a viewer."""
    return pic.resize((pic.width * scale, pic.height * scale), PILImage.NEAREST)


COMMANDS = {
    "generate": Command(generate_arguments, run_generate),
}
