"""Emoji: every single-codepoint emoji of the Noto Color Emoji font, captioned by its Unicode name.

The font comes from the Debian package `fonts-noto-color-emoji`; `data.dataset=emoji:PATH` reads
another copy. Codepoints are the font's own (its cmap, read with fontTools), less ASCII, controls,
joiners, variation selectors and codepoints this Python's `unicodedata` has no name for. Sorted by
codepoint, every 10th emoji is held out as the val split.

The font is a color bitmap font: its glyphs are PNGs drawn at one size (Pillow wants size=109),
so each emoji is drawn at that size on a white square and then resized to `data.image_size`.
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from motfusion.data.images import from_pil

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_PACKAGE = "fonts-noto-color-emoji"
BITMAP_SIZE = 109  # the one size the font's bitmaps exist at
CANVAS = 136  # a glyph at BITMAP_SIZE is at most 136 x 128 pixels
BACKGROUND = (255, 255, 255)
VAL_EVERY = 10


def check_font(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        hint = (
            f"install it with `apt-get install {EMOJI_PACKAGE}`"
            if path == EMOJI_FONT
            else f"or use data.dataset=emoji for the font of `apt-get install {EMOJI_PACKAGE}`"
        )
        raise FileNotFoundError(f"emoji font {path} not found; {hint}")
    return path


@functools.lru_cache(maxsize=4)
def emoji_codepoints(font_path: Path = EMOJI_FONT) -> tuple[int, ...]:
    """Sorted codepoints that the font maps to a glyph and that are named, visible symbols."""
    from fontTools.ttLib import TTFont

    with TTFont(check_font(font_path), lazy=True) as font:
        cmap = font.getBestCmap()
    keep = []
    for cp in sorted(cmap):
        ch = chr(cp)
        if cp >= 0x80 and unicodedata.category(ch)[0] not in "CMZ" and unicodedata.name(ch, ""):
            keep.append(cp)
    return tuple(keep)


def split_codepoints(codepoints: tuple[int, ...], split: str) -> tuple[int, ...]:
    """val: every VAL_EVERY-th codepoint (positions 9, 19, ...); train: the rest."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; choose from ['train', 'val']")
    held_out = lambda i: i % VAL_EVERY == VAL_EVERY - 1
    return tuple(cp for i, cp in enumerate(codepoints) if held_out(i) == (split == "val"))


@functools.lru_cache(maxsize=4)
def _font(font_path: Path):
    from PIL import ImageFont

    return ImageFont.truetype(str(check_font(font_path)), size=BITMAP_SIZE)


def render_emoji(codepoint: int, size: int, font_path: Path = EMOJI_FONT) -> torch.Tensor:
    """One emoji -> (3, size, size) in [-1, 1]: drawn in color, centered on white, resized."""
    from PIL import Image, ImageDraw

    font = _font(Path(font_path))
    ch = chr(codepoint)
    x0, y0, x1, y1 = font.getbbox(ch)
    canvas = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    at = ((CANVAS - (x1 - x0)) // 2 - x0, (CANVAS - (y1 - y0)) // 2 - y0)
    ImageDraw.Draw(canvas).text(at, ch, font=font, embedded_color=True)
    pic = canvas.resize((size, size), Image.LANCZOS)
    return from_pil(pic)  # (3, size, size)


def emoji_caption(codepoint: int) -> str:
    return unicodedata.name(chr(codepoint)).lower()


@dataclass(frozen=True)
class EmojiSample:
    image: torch.Tensor  # (3, H, W) in [-1, 1]
    caption: str
    codepoint: int


class EmojiDataset:
    """The emoji of one split as (image, caption) samples; finite. Renders are cached per index."""

    def __init__(self, *, font_path: Path = EMOJI_FONT, split: str = "train", image_size: int = 32):
        self.font_path, self.split, self.image_size = Path(font_path), split, image_size
        self.codepoints = split_codepoints(emoji_codepoints(self.font_path), split)
        self._images: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.codepoints)

    def sample(self, index: int) -> EmojiSample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside the {len(self)} {self.split} emoji")
        cp = self.codepoints[index]
        if index not in self._images:
            self._images[index] = render_emoji(cp, self.image_size, self.font_path)
        return EmojiSample(self._images[index], emoji_caption(cp), cp)
