"""The documentation's commands run: every `motfusion ...` line of the ```bash blocks of README.md and
docs/*.md, in page order, in one temporary working directory, through `motfusion.cli.main` (what
`motfusion` runs), at tiny scale; then the pages' ```python blocks.

TINY is the one table of what "tiny scale" changes in a command line; SKIP is the short list of lines
that do not run here, each with its reason. A line that is neither a `motfusion` command nor in SKIP
fails the test, so a new command in the docs is either run or explicitly excused.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from test_real_data import tiny_fashion

from motfusion.cli import main

ROOT = Path(__file__).resolve().parents[1]
# In this order: a page may use what an earlier one made (evaluation.md's runs/emoji comes from data.md,
# api.md and the README's Python lines sample from evaluation.md's runs/demo).
PAGES = [
    "docs/training.md",
    "docs/data.md",
    "docs/models.md",
    "docs/evaluation.md",
    "docs/api.md",
    "README.md",
]

TINY_RUN = (
    "model.dim=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.unet_channels=4",
    "data.tokenizer=bytes",  # a BPE is trained on 20,000 documents before step 1: seconds of shapes drawing
    "train.batch_size=2",
    "train.seq_len=256",
    "train.warmup=1",
    "train.log_every=1",
    "train.checkpoint_every=0",
    "train.tensorboard=false",
)
TINY_VAE = ("channels=8", "norm_groups=4", "batch_size=2", "val_images=4", "scale_images=8")
TINY_FASHION = "fashion:fashion-tiny"  # 32 + 16 IDX images: the real files' 10k test set is scored in full


@dataclass(frozen=True)
class Tiny:
    """How one command shrinks: flags set to these values (replaced, or added when absent) and
    key=value overrides appended after the line's own. The first row whose command matches and whose
    `when` occurs in the line applies."""

    command: str
    flags: dict[str, str] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    when: str = ""


TINY = [
    Tiny("train", {"--steps": "3"}, when="--resume"),  # the saved config is already tiny; one step more
    Tiny(
        "train", {"--steps": "2"}, (*TINY_RUN, "model.vocab_sizes=speech:8"), when="speech-mixed"
    ),  # k = 8 below
    Tiny("train", {"--steps": "2"}, (*TINY_RUN, f"data.dataset={TINY_FASHION}"), when="--recipe fashion"),
    Tiny("train", {"--steps": "2"}, TINY_RUN),
    Tiny("demo", {"--steps": "2", "--sample-steps": "2", "--n-eval": "2"}, TINY_RUN),
    Tiny("eval", {"--n": "2", "--steps": "2", "--max-tokens": "8", "--val-batches": "1"}),
    Tiny("generate", {"--n": "2", "--steps": "2", "--max-tokens": "8"}, when="--prompt"),
    Tiny("generate", {"--steps": "2", "--max-tokens": "8"}),
    Tiny("train-vae", {"--steps": "2", "--dataset": TINY_FASHION}, TINY_VAE, when="--dataset fashion"),
    Tiny("train-vae", {"--steps": "2"}, TINY_VAE),
    Tiny("train-vq", {"--steps": "2", "--batch-size": "2"}, ("val_images=4",)),
    Tiny("train-classifier", {"--steps": "2", "--batch-size": "8", "--data": "fashion-tiny"}),
    Tiny(
        "train-clip",
        {"--steps": "2", "--batch-size": "8", "--dataset": TINY_FASHION},
        when="--dataset fashion",
    ),
    Tiny("train-clip", {"--steps": "2", "--batch-size": "8"}),
    # Only the text sources whose Debian packages `make test` installs (bible-kjv, wordnet-base are optional).
    Tiny("make-speech-data", {"--n": "6", "--sources": "shapes,fortunes"}),
    Tiny("train-speech-tokenizer", {"--k": "8"}),
]

SKIP = {  # pattern (re.match on the line) -> why it does not run here
    r"torchrun ": "needs several GPUs; tests/test_distributed.py runs 2 ranks on CPU instead",
    r"apt-get ": "installs system packages (the Makefile's debs target does it for the tests)",
    r"make (demo|speech-demo|test|bench)\b": "`motfusion demo` runs here instead; the tests are this suite; tests/test_bench.py runs the bench",
    r"motfusion demo --recipe speech-demo": "makes 3,000 utterances, trains its codec and judge: tests/test_speech_demo.py runs it tiny",
    r"benchmarks/reproduce\.sh": "hours of runs: every result behind docs/RESULTS.md",
    r"\.venv/bin/python benchmarks/precision\.py": "minutes of timing; tests/test_bench.py runs one row",
    r"\.venv/bin/python benchmarks/optimizer\.py": "a minute of timing; tests/test_bench.py runs it tiny",
    r"\.venv/bin/python benchmarks/mot_gap\.py": "minutes of timing; tests/test_bench.py runs it tiny",
}
KNOWN_FAILURES: dict[str, str] = {}  # a documented line that fails because of the code -> the failure

FLAGS_WITHOUT_VALUE = {"--resume", "--raw-weights", "--dedup"}


def command_lines(text: str, lang: str = "bash") -> list[str]:
    """The lines of the page's ```lang blocks, continuations joined, comments and blanks dropped."""
    lines = []
    for block in re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S):
        block = block.replace("\\\n", " ")
        lines += [
            line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")
        ]
    return lines


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def skip_reason(line: str) -> str | None:
    return next((why for pattern, why in SKIP.items() if re.match(pattern, line)), KNOWN_FAILURES.get(line))


def tiny_argv(line: str) -> list[str]:
    """`motfusion CMD ...` -> the argv of its tiny-scale run: options and positionals in their order,
    the TINY row's flags set, then every key=value override (the line's, then TINY's) at the end."""
    words = shlex.split(line, comments=True)
    assert Path(words[0]).name == "motfusion", line
    command, rest = words[1], words[2:]
    items: list[list[str]] = []
    overrides = []
    i = 0
    while i < len(rest):
        word = rest[i]
        if word.startswith("--") and word not in FLAGS_WITHOUT_VALUE and i + 1 < len(rest):
            items.append([word, rest[i + 1]])
            i += 2
            continue
        if "=" in word and not word.startswith("-"):
            overrides.append(word)
        else:
            items.append([word])
        i += 1
    row = next((t for t in TINY if t.command == command and t.when in line), Tiny(command))
    for flag, value in row.flags.items():
        hit = next((item for item in items if item[0] == flag), None)
        if hit is not None:
            hit[1:] = [value]
        else:
            items.append([flag, value])
    return [command, *(w for item in items for w in item), *overrides, *row.overrides]


def write_user_data(root: Path) -> None:
    """docs/data.md's data/train.jsonl and data/pics/ (with one truncated picture for on_bad_sample=skip)."""
    rng = np.random.default_rng(0)
    (root / "data" / "img").mkdir(parents=True)
    (root / "data" / "pics").mkdir()
    lines = []
    for i, caption in enumerate(
        ["a red circle", "two blue squares", "a green triangle", "a yellow square"] * 3
    ):
        picture = PILImage.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
        picture.save(root / "data" / "img" / f"{i}.png")
        picture.save(root / "data" / "pics" / f"{i}.png")
        (root / "data" / "pics" / f"{i}.txt").write_text(caption)
        lines.append(f'{{"segments": [{{"text": "{caption}"}}, {{"image": "img/{i}.png"}}]}}')
    (root / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "data" / "pics" / "cut.png").write_bytes((root / "data" / "pics" / "0.png").read_bytes()[:60])
    (root / "data" / "pics" / "cut.txt").write_text("a cut picture")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    write_user_data(root)
    tiny_fashion(root / "fashion-tiny", n_train=32, n_test=16)
    before = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(before)


_ran: dict[str, list[str]] = {}  # page -> its failures, once run


def run_page(page: str) -> list[str]:
    """Run `page` (and, first, every page before it that has not run) in the shared working directory."""
    for earlier in PAGES[: PAGES.index(page)]:
        if earlier not in _ran:
            run_page(earlier)
    failures = []
    text = (ROOT / page).read_text()
    for line in command_lines(text):
        if skip_reason(line):
            continue
        if Path(line.split()[0]).name != "motfusion":
            failures.append(f"{page}: {line!r} is neither a motfusion command nor in SKIP")
            continue
        argv, start, stderr = tiny_argv(line), time.perf_counter(), io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = main(argv)
        err = stderr.getvalue().strip().splitlines()
        print(
            f"{time.perf_counter() - start:5.1f} s  exit {status}  motfusion {shlex.join(argv)}"
        )  # pytest -s shows it
        if status != 0:
            failures.append(f"{page}: {line!r} -> exit {status}: {err[-1] if err else ''}")
    for code in python_blocks(text):
        exec(compile(code, f"{page} (python block)", "exec"), {"__name__": "__docs__"})
    _ran[page] = failures
    return failures


@pytest.mark.parametrize("page", PAGES)
def test_page_commands_run_at_tiny_scale(page, workdir):
    failures = _ran[page] if page in _ran else run_page(page)
    assert not failures, "\n".join(failures)


def test_tiny_rewrite():
    assert tiny_argv("motfusion train --recipe debug --out runs/dbg --steps 200 model.untie=ffn,attn") == [
        "train",
        "--recipe",
        "debug",
        "--out",
        "runs/dbg",
        "--steps",
        "2",
        "model.untie=ffn,attn",
        *TINY_RUN,
    ]
    assert tiny_argv("motfusion train --out runs/dbg --resume --steps 400  # continue") == [
        "train",
        "--out",
        "runs/dbg",
        "--resume",
        "--steps",
        "3",
    ]
    assert tiny_argv('.venv/bin/motfusion generate --ckpt r --prompt "a red circle"') == [
        "generate",
        "--ckpt",
        "r",
        "--prompt",
        "a red circle",
        "--n",
        "2",
        "--steps",
        "2",
        "--max-tokens",
        "8",
    ]


def test_every_skip_is_needed_and_every_page_has_commands():
    lines = [line for page in PAGES for line in command_lines((ROOT / page).read_text())]
    for pattern in SKIP:
        assert any(re.match(pattern, line) for line in lines), f"SKIP {pattern!r} matches no documented line"
    for page in PAGES:
        assert command_lines((ROOT / page).read_text()) or python_blocks((ROOT / page).read_text()), page


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", (ROOT / page).read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, fragment = target.partition("#")
            file = ((ROOT / page).parent / path).resolve() if path else ROOT / page
            assert file.exists(), f"{page}: link to {target} names no file"
            if fragment and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", file.read_text(), flags=re.M)
                assert fragment in {anchor(h) for h in headings}, (
                    f"{page}: no heading for #{fragment} in {path}"
                )


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text) < 8_500, f"README.md has {len(text)} characters: move detail into docs/"
    assert "docs/demo_samples.png" in text
    for page in PAGES[:-1]:
        assert page in text, f"README.md does not link {page}"
