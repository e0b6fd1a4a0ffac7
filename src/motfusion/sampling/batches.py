"""Many prompts or images through a Generator, a batch at a time, with a progress bar (stderr, shown
only on a terminal). One random stream runs through the batches in order, so a seed gives the same
outputs whatever consumes them: the CLI, MotFusion or an evaluation suite."""

from __future__ import annotations

import torch
from tqdm import tqdm

from motfusion.sampling.generate import Generator


def images_in_batches(
    gen: Generator,
    prompts: list[str],
    generator: torch.Generator | None = None,
    batch_size: int = 32,
    desc: str = "text to image",
) -> torch.Tensor:
    """Text to image -> pixels (N, 3, H, W) in [-1, 1] on the CPU."""
    out = []
    with tqdm(total=len(prompts), desc=desc, unit="image", disable=None, leave=False) as bar:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            out.append(gen.decode_images(gen.images(chunk, generator)).cpu())
            bar.update(len(chunk))
    return torch.cat(out) if out else torch.zeros(0, 3, gen.image_size, gen.image_size)


def captions_in_batches(
    gen: Generator,
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    batch_size: int = 32,
    desc: str = "image to text",
) -> list[str]:
    """Image to text: pixels (N, 3, H, W) in [-1, 1] -> one caption each."""
    out: list[str] = []
    with tqdm(total=len(images), desc=desc, unit="image", disable=None, leave=False) as bar:
        for i in range(0, len(images), batch_size):
            out += gen.captions(images[i : i + batch_size].to(gen.device), generator)
            bar.update(len(out) - bar.n)
    return out


def edits_in_batches(
    gen: Generator,
    images: torch.Tensor,
    instructions: list[str],
    generator: torch.Generator | None = None,
    batch_size: int = 32,
    layout: str = "source-first",
    desc: str = "editing",
) -> torch.Tensor:
    """Image editing: source pixels (N, 3, H, W) in [-1, 1] and an instruction each -> edited pixels;
    `layout`: the model's data.edit_layout."""
    out = []
    with tqdm(total=len(instructions), desc=desc, unit="image", disable=None, leave=False) as bar:
        for i in range(0, len(instructions), batch_size):
            chunk = instructions[i : i + batch_size]
            sources = images[i : i + batch_size].to(gen.device)
            out.append(gen.decode_images(gen.edit(sources, chunk, generator, layout=layout)).cpu())
            bar.update(len(chunk))
    return torch.cat(out) if out else torch.zeros(0, 3, gen.image_size, gen.image_size)
