"""Making a paired text-speech dataset with espeak-ng (`motfusion make-speech-data`).

Sentences come from the shapes captions and from real English text shipped by Debian packages
(fortunes, the King James Bible of bible-kjv, WordNet's glosses and examples). espeak-ng speaks each
with one of several voices at a random speed; the result is resampled to 16 kHz mono and written as

    DIR/wav/000000.wav ...     the utterances
    DIR/manifest.jsonl         one {"segments": [{"text": ...}, {"audio": "wav/000000.wav"}]} per line
    DIR/dataset.json           how it was made, and per line: split, source, voice, speed, seconds

Text is normalized before it is spoken (lowercase letters, apostrophes and single spaces), so the
transcript is exactly what was said and the character error rate of speech-to-text is meaningful.
Sentences with digits or unusual symbols are skipped rather than spelled out. A sentence goes to
the val split (5% by default) by a hash of its text, so no val sentence is heard in training, in
any voice. Everything is a function of the seed and of the installed packages' text. data/speech.py
reads the result back.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from motfusion.codecs.audio import read_wav, write_wav
from motfusion.data.shapes import ShapesDataset, caption_text
from motfusion.data.speech import INFO, MANIFEST
from motfusion.errors import ConfigError

SAMPLE_RATE = 16000


VOICES = ("en-us", "en", "en+f3", "en+m3", "en-us+f2", "en-gb-x-rp+m1")


SPEED_RANGE = (150, 190)  # words per minute (espeak-ng -s)


VAL_PERCENT = 5


_ALLOWED = re.compile(r"[A-Za-z ,.;:!?'\"()-]+")


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise FileNotFoundError(
            "espeak-ng not found: install the Debian package espeak-ng "
            "(apt-get update && apt-get install -y espeak-ng)"
        )
    return path


def speak(text: str, voice: str = "en-us", speed: int = 175, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """espeak-ng says `text` -> (S,) float32 samples at `sample_rate` (espeak-ng itself outputs 22050 Hz)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "say.wav"
        proc = subprocess.run(
            [espeak_binary(), "-v", voice, "-s", str(speed), "-w", str(out), "--stdin"],
            input=text,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not out.is_file():
            raise ConfigError(
                f"espeak-ng failed for voice {voice!r}: {proc.stderr.strip() or proc.returncode} "
                "(list voices with `espeak-ng --voices=en`; variants look like en+f3)"
            )
        return trim_silence(read_wav(out, sample_rate).numpy(), sample_rate)


def trim_silence(
    wave: np.ndarray, sample_rate: int, threshold: float = 0.01, keep_s: float = 0.08
) -> np.ndarray:
    """Cut espeak-ng's trailing silence (about 0.3 s) down to `keep_s` after the last sample above `threshold`."""
    loud = np.flatnonzero(np.abs(wave) > threshold)
    end = len(wave) if loud.size == 0 else min(len(wave), int(loud[-1]) + 1 + int(keep_s * sample_rate))
    return wave[:end]


def normalize(text: str) -> str:
    """Lowercase letters, apostrophes and single spaces: what a listener can recover from speech."""
    return " ".join(
        re.sub(r"[^a-z' ]+", " ", text.lower()).replace(" '", " ").replace("' ", " ").split()
    ).strip("'")


def sentences_from(texts: list[str], min_chars: int, max_chars: int) -> list[str]:
    """Split into sentences, keep the plain-English ones of the right length, normalize, dedupe."""
    seen: dict[str, None] = {}
    for text in texts:
        for sentence in _SENTENCE_END.split(" ".join(text.split())):
            if _ALLOWED.fullmatch(sentence):
                s = normalize(sentence)
                if min_chars <= len(s) <= max_chars:
                    seen.setdefault(s)
    return list(seen)


def _require(path: Path, package: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: install the Debian package {package} (apt-get install -y {package})"
        )
    return path


def shapes_texts(n: int = 4000, seed: int = 0) -> list[str]:
    ds = ShapesDataset(seed=seed, split="train")
    return [caption_text(ds.draw(i)[1]) for i in range(n)]


def fortune_texts(root: Path = Path("/usr/share/games/fortunes")) -> list[str]:
    """Every fortune cookie (entries separated by lines holding %), attributions ("-- X") dropped."""
    texts = []
    for path in sorted(
        p for p in _require(root, "fortunes").iterdir() if p.is_file() and not p.suffix and not p.is_symlink()
    ):
        for entry in path.read_text(encoding="latin-1").split("\n%\n"):
            texts.append(" ".join(line for line in entry.splitlines() if not line.strip().startswith("--")))
    return texts


def bible_texts() -> list[str]:
    """The verses of the King James Bible, through the `bible` program of bible-kjv."""
    binary = shutil.which("bible")
    if binary is None:
        raise FileNotFoundError(
            "bible not found: install the Debian package bible-kjv (apt-get install -y bible-kjv)"
        )
    out = subprocess.run(
        [binary, "-l100000", "Genesis 1:1-Revelation 22:21"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=True,
    ).stdout
    return [m.group(1) for m in re.finditer(r"^\s+\d+ (.+)$", out, flags=re.MULTILINE)]


def wordnet_texts(root: Path = Path("/usr/share/wordnet")) -> list[str]:
    """WordNet glosses: each synset's definition and its quoted example sentences."""
    texts = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in _require(root / f"data.{pos}", "wordnet-base").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or " | " not in line:  # license header
                continue
            gloss = line.split(" | ", 1)[1]
            texts += [part.strip().strip('"') + "." for part in gloss.split(";")]
    return texts


SOURCES: dict[str, Callable[[], list[str]]] = {
    "shapes": shapes_texts,
    "fortunes": fortune_texts,
    "bible": bible_texts,
    "wordnet": wordnet_texts,
}


def sentence_pools(sources: list[str], min_chars: int, max_chars: int) -> dict[str, list[str]]:
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown or not sources:
        raise ConfigError(f"unknown speech text source(s) {unknown}; choose from {sorted(SOURCES)}")
    pools = {name: sentences_from(SOURCES[name](), min_chars, max_chars) for name in sources}
    empty = [name for name, pool in pools.items() if not pool]
    if empty:
        raise ConfigError(f"no sentence of {min_chars}-{max_chars} characters in source(s) {empty}")
    return pools


def split_of(text: str, val_percent: int = VAL_PERCENT) -> str:
    return "val" if zlib.crc32(text.encode()) % 100 < val_percent else "train"


def make_speech_data(
    out: str | Path,
    *,
    n: int = 2000,
    sources: tuple[str, ...] = tuple(SOURCES),
    voices: tuple[str, ...] = VOICES,
    seed: int = 0,
    min_chars: int = 8,
    max_chars: int = 48,
    val_percent: int = VAL_PERCENT,
    log: Callable[[str], None] = partial(print, flush=True),
) -> Path:
    """Write `n` utterances to `out` (see the module docstring); returns the manifest's path."""
    if n <= 0 or not voices or not 0 <= val_percent < 100:
        raise ConfigError("make-speech-data needs --n > 0, at least one voice and --val-percent in [0, 100)")
    for voice in voices:  # a wrong voice name fails now, not after the sentence pools are built
        speak("test", voice)
    out = Path(out)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pools = sentence_pools(list(sources), min_chars, max_chars)
    log(
        "sentences: "
        + ", ".join(f"{k} {len(v)}" for k, v in pools.items())
        + f" ({time.perf_counter() - t0:.1f} s)"
    )
    rng = np.random.default_rng(seed)
    lines, items, seconds = [], [], 0.0
    for i in tqdm(range(n), desc="make-speech-data", unit="utt", disable=None):  # stderr, on a terminal only
        source = str(rng.choice(list(pools)))
        text = pools[source][int(rng.integers(len(pools[source])))]
        voice, speed = str(rng.choice(list(voices))), int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1))
        wave = speak(text, voice, speed)
        name = f"wav/{i:06d}.wav"
        write_wav(out / name, wave, SAMPLE_RATE)
        lines.append(json.dumps({"segments": [{"text": text}, {"audio": name}]}))
        items.append(
            {
                "split": split_of(text, val_percent),
                "source": source,
                "voice": voice,
                "speed": speed,
                "seconds": round(len(wave) / SAMPLE_RATE, 3),
            }
        )
        seconds += len(wave) / SAMPLE_RATE
        if (i + 1) % 500 == 0 and i + 1 < n:
            with tqdm.external_write_mode():  # above the bar, not through it
                log(f"{i + 1}/{n} utterances, {time.perf_counter() - t0:.0f} s")
    (out / MANIFEST).write_text("\n".join(lines) + "\n")
    info = {
        "sample_rate": SAMPLE_RATE,
        "seed": seed,
        "sources": list(sources),
        "voices": list(voices),
        "min_chars": min_chars,
        "max_chars": max_chars,
        "val_percent": val_percent,
        "items": items,
    }
    (out / INFO).write_text(json.dumps(info, indent=1) + "\n")
    dt = time.perf_counter() - t0
    log(
        f"wrote {n} utterances ({seconds:.0f} s of audio, {sum(it['split'] == 'val' for it in items)} val) to {out} "
        f"in {dt:.1f} s: {n / dt:.1f} utterances/s, {seconds / dt:.0f}x real time"
    )
    return out / MANIFEST
