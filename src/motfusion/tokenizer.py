"""Text tokenizers with the special tokens that structure a mixed-modal sequence.

The default is byte-level: ids 0..255 are bytes, then the specials, so nothing is trained or
downloaded. A byte-level BPE from HF `tokenizers` is the alternative, in two forms:

- `data.tokenizer=bpe:N`: trained with the run, on its own training text, before step 1 (at most N
  tokens; the model's tables have N rows). It is saved as RUN/tokenizer.json and in every
  checkpoint, so a checkpoint carries the tokenizer it was trained with.
- `data.tokenizer=PATH`: a tokenizer JSON trained beforehand (`train_bpe`), read from PATH.

On a closed vocabulary such as the shapes captions, bpe:512 makes each word one token: a caption
of about 35 bytes becomes about 7 tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from motfusion.config import TRAINED_TOKENIZER
from motfusion.errors import ConfigError

# Order fixes the ids. Reserved slots keep ids stable when a modality adds markers later.
SPECIALS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<bosp>", "<eosp>") + tuple(
    f"<reserved{i}>" for i in range(9)
)
TOKENIZER_FILE = "tokenizer.json"  # a bpe:N tokenizer, in its run directory and in each checkpoint


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
    """A byte-level BPE from HF `tokenizers`, saved as one JSON file that contains our specials.

    `vocab_size`: the model's table size when it is fixed in advance (bpe:N); training may stop
    short of it when the text has no more pairs to merge, and the spare rows are never used."""

    def __init__(self, path: str | Path, vocab_size: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} not found (train one with motfusion.tokenizer.train_bpe)"
            )
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on a file it cannot parse
            raise ConfigError(
                f"tokenizer {path} is not a tokenizers JSON file ({str(e)[:120]}); "
                "train one with motfusion.tokenizer.train_bpe"
            ) from None
        self._init(tok, str(path), vocab_size)

    @classmethod
    def from_json(cls, text: str, vocab_size: int | None = None) -> BPETokenizer:
        """A tokenizer from its JSON text (as an exported model's metadata carries it)."""
        tok = cls.__new__(cls)
        try:
            parsed = HFTokenizer.from_str(text)
        except Exception as e:  # as in __init__
            raise ConfigError(f"the tokenizer JSON given is not a tokenizers file ({str(e)[:120]})") from None
        tok._init(parsed, "the JSON given", vocab_size)
        return tok

    def _init(self, tok: HFTokenizer, where: str, vocab_size: int | None) -> None:
        self._tok = tok
        ids = {name: tok.token_to_id(name) for name in SPECIALS}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ConfigError(
                f"tokenizer {where} lacks the special tokens {missing}; train it with train_bpe"
            )
        super().__init__(ids)
        trained = tok.get_vocab_size()
        if vocab_size is not None and trained > vocab_size:
            raise ConfigError(f"tokenizer {where} has {trained} tokens, more than the model's {vocab_size}")
        self.vocab_size = vocab_size or trained

    def to_json(self) -> str:
        return self._tok.to_str()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> BPETokenizer:
    """Train a byte-level BPE on `texts` with motfusion's specials and save it to `path`."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return BPETokenizer(path)


def trained_vocab(spec: str) -> int | None:
    """N for a tokenizer trained with the run (data.tokenizer=bpe:N), else None."""
    match = TRAINED_TOKENIZER.fullmatch(spec)
    return int(match.group(1)) if match else None


def build_tokenizer(spec: str, directory: str | Path | None = None) -> Tokenizer:
    """The tokenizer of data.tokenizer=`spec`: bytes, bpe:N (its tokenizer.json in `directory`, the
    run's or a checkpoint's) or the path of a tokenizer JSON."""
    if spec == "bytes":
        return ByteTokenizer()
    n = trained_vocab(spec)
    if n is None:
        return BPETokenizer(spec)
    path = Path(directory or ".") / TOKENIZER_FILE
    if directory is None or not path.is_file():
        raise FileNotFoundError(
            f"data.tokenizer={spec} is trained with its run, and {path} is not there: "
            "pass the run or checkpoint directory that holds it"
        )
    return BPETokenizer(path, vocab_size=n)


def vocab_size(spec: str) -> int:
    """The model's text vocabulary for data.tokenizer=`spec`, without building the tokenizer where
    that needs a trained file (bpe:N)."""
    return trained_vocab(spec) or build_tokenizer(spec).vocab_size


def length_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer that never gives fewer tokens than `spec`'s, for checking that documents fit
    before a bpe:N tokenizer exists: bytes (a byte-level BPE's tokens each cover one byte or more)."""
    return ByteTokenizer() if trained_vocab(spec) else build_tokenizer(spec)
