"""The evaluation suites behind one registry: `motfusion eval --suite NAME` and `evaluate(...)`.

Every suite takes a Generator, the run's config and the same options, and returns flat metrics.
A new suite is one more entry in SUITES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from motfusion.config import Config
from motfusion.errors import ConfigError
from motfusion.evaluation.classifier import load_classifier
from motfusion.evaluation.clip import load_clip
from motfusion.evaluation.image_metrics import evaluate_emoji, evaluate_fashion
from motfusion.evaluation.shapes_suite import evaluate_edits, evaluate_shapes
from motfusion.evaluation.speech import evaluate_speech
from motfusion.sampling import Generator


@dataclass(kw_only=True)
class SuiteOptions:
    n: int = 64  # prompts, images or utterances per metric
    seed: int = 0
    classifier: Path = Path("runs/classifier")  # fashion: a `motfusion train-classifier` directory
    clip: Path | None = None  # fashion, emoji: a `motfusion train-clip` directory (default runs/clip-SUITE)
    judge: Path | None = None  # speech: a `motfusion train-asr-judge` directory (default DATA/asr-judge)


def _shapes(gen: Generator, cfg: Config, o: SuiteOptions) -> dict[str, float]:
    return evaluate_shapes(gen, n_single=o.n, n_prompts=o.n, n_captions=o.n, seed=o.seed).metrics


def _edit(gen: Generator, cfg: Config, o: SuiteOptions) -> dict[str, float]:
    return evaluate_edits(gen, n=o.n, seed=o.seed, layout=cfg.data.edit_layout).metrics


def _fashion(gen: Generator, cfg: Config, o: SuiteOptions) -> dict[str, float]:
    clip, _ = load_clip(o.clip or Path("runs/clip-fashion"))
    return evaluate_fashion(gen, cfg, load_classifier(o.classifier), clip, n=o.n, seed=o.seed)


def _emoji(gen: Generator, cfg: Config, o: SuiteOptions) -> dict[str, float]:
    clip, _ = load_clip(o.clip or Path("runs/clip-emoji"))
    return evaluate_emoji(gen, cfg, clip, n=o.n, seed=o.seed)


def _speech(gen: Generator, cfg: Config, o: SuiteOptions) -> dict[str, float]:
    return evaluate_speech(gen, cfg, n=o.n, seed=o.seed, judge=o.judge).metrics


SUITES: dict[str, Callable[[Generator, Config, SuiteOptions], dict[str, float]]] = {
    "shapes": _shapes,  # geneval (single object, every caption form) and caption accuracy
    "edit": _edit,  # edit_accuracy on held-out shapes edits, and edit_untouched
    "fashion": _fashion,  # FID on classifier features, class accuracy, CLIP score, caption accuracy
    "emoji": _emoji,  # CLIP score of generated emoji against the real ones' ceiling
    "speech": _speech,  # speech-to-text CER, text-to-speech unit error rate and judge WER
}


def evaluate(
    suite: str, gen: Generator, cfg: Config, options: SuiteOptions | None = None
) -> dict[str, float]:
    if suite not in SUITES:
        raise ConfigError(f"unknown evaluation suite {suite!r}; choose one of {sorted(SUITES)}")
    return SUITES[suite](gen, cfg, options or SuiteOptions())
