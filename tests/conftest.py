"""Shared fixtures: tiny configs and random packed batches with several documents and images."""

import random

import pytest
import torch

from motfusion.cli import main
from motfusion.recipes import get_recipe
from motfusion.sequence import Image, Text, collate, encode_document
from motfusion.tokenizer import ByteTokenizer

torch.set_num_threads(
    1
)  # tiny models: a second thread buys little and oversubscribes when tests spawn processes


@pytest.fixture
def tok():
    return ByteTokenizer()


@pytest.fixture
def cfg():
    return get_recipe("debug")


def random_docs(rng: random.Random, image_size: int, n_docs: int, max_segments: int = 4):
    """Documents mixing text and images in random order (possibly text-only or image-only)."""
    docs = []
    for _ in range(n_docs):
        doc = []
        for _ in range(rng.randint(1, max_segments)):
            if rng.random() < 0.5:
                doc.append(Text("".join(rng.choice("abc xyz") for _ in range(rng.randint(1, 12)))))
            else:
                doc.append(Image(torch.rand(3, image_size, image_size) * 2 - 1))
        docs.append(doc)
    return docs


def random_batch(
    tok, seed: int = 0, rows: int = 3, seq_len: int = 160, image_size: int = 8, patch_size: int = 4
):
    """A packed batch: each row holds as many random documents as fit."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    packed = []
    for _ in range(rows):
        row, used = [], 0
        for doc in random_docs(rng, image_size, 6):
            enc = encode_document(doc, tok, patch_size)
            if used + len(enc) <= seq_len:
                row.append(enc)
                used += len(enc)
        packed.append(row)
    return collate(packed, seq_len, tok.pad)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *phrases: str) -> None:
    """The CLI's promise for a user's mistake: one line, no traceback, naming what to fix."""
    assert err.startswith("motfusion: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for phrase in phrases:
        assert str(phrase) in err, (phrase, err)
