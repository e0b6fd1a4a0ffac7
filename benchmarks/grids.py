"""Sample grids for docs/RESULTS.md: the same prompts and seeds through several runs.

    python benchmarks/grids.py --out docs/results_shapes.png --prompt "a red circle" ... RUN [RUN ...]

Each row is one prompt; each run gets `--n` columns (seeds 0..n-1), its name above them. Pixels
come from each run's own decoder (latents through its VAE, VQ codes through its VQ-VAE).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image as PILImage
from PIL import ImageDraw

from motfusion.data.images import to_pil
from motfusion.sampling.generate import SampleConfig
from motfusion.sampling.load import load_generator


def samples(run: Path, prompts: list[str], n: int, steps: int) -> list[list[torch.Tensor]]:
    """n images per prompt from the run's latest checkpoint, as pixels in [-1, 1]."""
    gen, _ = load_generator(run, sample=SampleConfig(steps=steps))
    rows = [[] for _ in prompts]
    for seed in range(n):
        images = gen.images(prompts, torch.Generator().manual_seed(seed))
        pixels = gen.decode_images(images)
        for row, im in zip(rows, pixels):
            row.append(im.clamp(-1, 1))
    return rows


def sheet(prompts: list[str], runs: dict[str, list[list[torch.Tensor]]], path: Path, size: int = 64) -> None:
    pad, head = 4, 18
    measure = ImageDraw.Draw(PILImage.new("RGB", (1, 1)))
    label_w = int(max(measure.textlength(p) for p in prompts)) + 12
    n = len(next(iter(runs.values()))[0])
    block = n * (size + pad) + 2 * pad
    out = PILImage.new(
        "RGB", (label_w + len(runs) * block, head + len(prompts) * (size + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(out)
    for j, (name, rows) in enumerate(runs.items()):
        x0 = label_w + j * block
        draw.text((x0, 3), name, fill="black")
        for i, row in enumerate(rows):
            for k, im in enumerate(row):
                tile = to_pil(im, scale=1).resize((size, size), PILImage.NEAREST)
                out.paste(tile, (x0 + k * (size + pad), head + i * (size + pad)))
    for i, p in enumerate(prompts):
        draw.text((4, head + i * (size + pad) + size // 2 - 6), p, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--n", type=int, default=3, help="samples per prompt and run")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    grids = {run.name: samples(run, args.prompt, args.n, args.steps) for run in args.runs}
    sheet(args.prompt, grids, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
