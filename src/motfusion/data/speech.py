"""A paired text-speech dataset on disk (made by data/espeak.py, or a user's own in the same layout)
read back: its utterances (`read_speech_data`) and the training documents of `data.dataset=speech:DIR`
(`SpeechDataset`): text->speech and speech->text, with shapes text-image documents mixed in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from motfusion.codecs.speech import (
    UNITS_FILE,
    Speech,
    SpeechTokenizer,
    load_units,
    resolve_speech_dirs,
)
from motfusion.config import Config
from motfusion.data.documents import document_for, split_seed
from motfusion.data.shapes import ShapesDataset
from motfusion.errors import ConfigError, DataError
from motfusion.sequence import Document, Text

MANIFEST, INFO = "manifest.jsonl", "dataset.json"


# ---- making and reading a dataset ------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    text: str
    audio: Path
    split: str


def read_speech_data(root: str | Path) -> list[Utterance]:
    """The utterances of a dataset written by `make_speech_data`, in manifest order."""
    root = Path(root)
    for name in (MANIFEST, INFO):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{root / name} not found: make the dataset with `motfusion make-speech-data --out {root}`"
            )
    items = json.loads((root / INFO).read_text())["items"]
    lines = (root / MANIFEST).read_text().splitlines()
    if len(lines) != len(items):
        raise DataError(
            f"{root / MANIFEST} has {len(lines)} lines but {root / INFO} describes {len(items)}: "
            "make the dataset again with motfusion make-speech-data"
        )
    utterances = []
    for line_no, (line, item) in enumerate(zip(lines, items), 1):
        try:
            segments = {key: value for seg in json.loads(line)["segments"] for key, value in seg.items()}
            utterances.append(Utterance(segments["text"], root / segments["audio"], item["split"]))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise DataError(
                f'{root / MANIFEST}:{line_no}: expected {{"segments": [{{"text": ...}}, {{"audio": ...}}]}}'
            ) from None
    return utterances


def check_vocab(cfg: Config, k: int, tokenizer_dir: Path) -> None:
    """The model's speech vocabulary must be the tokenizer's: one embedding row and logit per unit."""
    got = cfg.model.vocab_sizes.get("speech")
    if got != k:
        raise ConfigError(
            f"model.vocab_sizes has speech:{got} but the speech tokenizer at {tokenizer_dir} has k={k} "
            f"units: set model.vocab_sizes=speech:{k}"
        )


class SpeechDataset:
    """`data.dataset=speech:PATH` for one split: documents of text->speech or speech->text pairs
    (`data.speech_text_first_prob`), with shapes text-image documents mixed in
    (`data.speech_shapes_share`, laid out as the shapes dataset lays them out).

    PATH is a dataset directory (its tokenizer in PATH/tokenizer) or a tokenizer directory. The
    pipeline's EpochOrder shuffles the utterances epoch by epoch; a stream position that draws a
    shapes document takes a random shapes sample instead of its utterance.
    """

    def __init__(self, texts: list[str], units: list[torch.Tensor], cfg: Config, split: str):
        self.texts, self.units, self.cfg = texts, units, cfg
        d = cfg.data
        self.shapes = ShapesDataset(
            image_size=d.image_size,
            seed=split_seed(cfg, split),
            split=split,
            max_objects=d.max_objects,
            single_object_prob=d.single_object_prob,
        )

    @classmethod
    def build(cls, cfg: Config, split: str, arg: str) -> SpeechDataset:
        if not arg:
            raise ConfigError(
                "data.dataset=speech needs a directory: speech:DIR (made by motfusion make-speech-data)"
            )
        data_dir, tok_dir = resolve_speech_dirs(arg)
        utterances = read_speech_data(data_dir)
        units, _ = load_units(tok_dir / UNITS_FILE)
        if len(units) != len(utterances):
            raise DataError(
                f"{tok_dir / UNITS_FILE} holds units of {len(units)} utterances but {data_dir} has "
                f"{len(utterances)}: re-run motfusion train-speech-tokenizer --data {data_dir}"
            )
        check_vocab(cfg, SpeechTokenizer.load(tok_dir).vocab_size, tok_dir)
        keep = [i for i, u in enumerate(utterances) if u.split == split]
        if not keep:
            raise DataError(
                f"{data_dir} has no {split} utterance; make more with motfusion make-speech-data --n"
            )
        return cls([utterances[i].text for i in keep], [units[i] for i in keep], cfg, split)

    def __len__(self) -> int:
        return len(self.texts)

    def document(self, index: int, rng: np.random.Generator) -> Document:
        d = self.cfg.data
        if rng.random() < d.speech_shapes_share:
            return document_for(self.shapes.sample(int(rng.integers(2**31))), rng, d, self.cfg.objective)
        text, speech = Text(self.texts[index]), Speech(self.units[index])
        return [text, speech] if rng.random() < d.speech_text_first_prob else [speech, text]
