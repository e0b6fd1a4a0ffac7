"""Text tokenizers with the special tokens that structure a mixed-modal sequence.

The default is byte-level: ids 0..255 are bytes, then the specials, so nothing is trained or
downloaded. A BPE tokenizer trained with HF `tokenizers` is the alternative (`data.tokenizer=PATH`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable

# Order fixes the ids. Reserved slots keep ids stable when a modality adds markers later.
SPECIALS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<bosp>", "<eosp>") + tuple(f"<reserved{i}>" for i in range(9))


class Tokenizer(ABC):
    """Common surface: `encode`, `decode`, `vocab_size` and the special ids as attributes."""

    vocab_size: int

    def __init__(self, special_ids: dict[str, int]):
        self.special_ids = special_ids
        self.pad, self.bos, self.eos = special_ids["<pad>"], special_ids["<bos>"], special_ids["<eos>"]
        self.boi, self.eoi = special_ids["<boi>"], special_ids["<eoi>"]

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids.values()


class ByteTokenizer(Tokenizer):
    def __init__(self) -> None:
        super().__init__({name: 256 + i for i, name in enumerate(SPECIALS)})
        self.vocab_size = 256 + len(SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """A byte-level BPE from HF `tokenizers`, saved as one JSON file that contains our specials."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found (train one with motfusion.tokenizer.train_bpe)")
        self._tok = HFTokenizer.from_file(str(path))
        ids = {name: self._tok.token_to_id(name) for name in SPECIALS}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer {path} lacks the special tokens {missing}; train it with train_bpe")
        super().__init__(ids)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> BPETokenizer:
    """Train a byte-level BPE on `texts` with motfusion's specials and save it to `path`."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return BPETokenizer(path)


def build_tokenizer(spec: str) -> Tokenizer:
    return ByteTokenizer() if spec == "bytes" else BPETokenizer(spec)
