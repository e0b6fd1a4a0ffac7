"""Step matching, as the Mixture-of-Transformers paper reports it.

For each modality both runs log, take the dense run's final smoothed loss as the target, find the first
step at which the MoT run's smoothed loss is at or below it, and report that step, its training FLOPs and
its wall-clock time as fractions of what the dense run spent in total. A fraction of 0.45 reads "MoT
matched the dense model's final loss with 45% of its steps".
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from motfusion.errors import ConfigError
from motfusion.report import read_metrics, save_figure, smooth, style_axes
from motfusion.training.logging import METRICS_FILE  # noqa: E402

EXCLUDED = ("loss/moe_balance", "loss/contrastive")  # auxiliary losses, not modalities


@dataclass(frozen=True)
class Curve:
    """One modality's logged points of a run, with its smoothed loss (EMA as `report.smooth`)."""

    steps: list[int]
    flops: list[float | None]
    seconds: list[float | None]
    smoothed: list[float]


@dataclass(frozen=True)
class Match:
    modality: str
    dense_final_loss: float
    dense_steps: int
    dense_flops: float | None
    dense_seconds: float | None
    mot_step: int | None  # None: the MoT run never reached the dense final loss
    mot_flops: float | None
    mot_seconds: float | None
    step_fraction: float | None
    flops_fraction: float | None
    time_fraction: float | None

    @property
    def reached(self) -> bool:
        return self.mot_step is not None


def curve(records: list[dict], key: str) -> Curve:
    """The finite points of `key` (skipped steps log non-finite losses), in step order."""
    rows = sorted((r for r in records if key in r and math.isfinite(r[key])), key=lambda r: r["step"])
    return Curve(
        steps=[r["step"] for r in rows],
        flops=[r.get("cumulative_flops") for r in rows],
        seconds=[r.get("elapsed_s") for r in rows],
        smoothed=smooth([r[key] for r in rows]),
    )


def _fraction(part: float | None, whole: float | None) -> float | None:
    return None if part is None or not whole else part / whole


def match(modality: str, dense: Curve, mot: Curve) -> Match:
    """Where the MoT curve first reaches the dense curve's final smoothed loss."""
    target = dense.smoothed[-1]
    i = next((i for i, v in enumerate(mot.smoothed) if v <= target), None)
    step, flops, seconds = (None, None, None) if i is None else (mot.steps[i], mot.flops[i], mot.seconds[i])
    return Match(
        modality=modality,
        dense_final_loss=target,
        dense_steps=dense.steps[-1],
        dense_flops=dense.flops[-1],
        dense_seconds=dense.seconds[-1],
        mot_step=step,
        mot_flops=flops,
        mot_seconds=seconds,
        step_fraction=_fraction(step, dense.steps[-1]),
        flops_fraction=_fraction(flops, dense.flops[-1]),
        time_fraction=_fraction(seconds, dense.seconds[-1]),
    )


def modalities(dense: list[dict], mot: list[dict]) -> list[str]:
    """The per-modality loss keys logged by both runs, in the dense run's order."""
    keys = lambda rows: dict.fromkeys(
        k for r in rows for k in r if k.startswith("loss/") and k not in EXCLUDED
    )
    theirs = keys(mot)
    return [k for k in keys(dense) if k in theirs]


def _load(run: Path) -> list[dict]:
    if not Path(run).is_dir():
        raise FileNotFoundError(f"run directory {run} not found")
    records = read_metrics(Path(run) / METRICS_FILE)
    if not records:
        raise FileNotFoundError(f"{Path(run) / METRICS_FILE} holds no records")
    return records


def compare(dense_run: Path, mot_run: Path, out: Path) -> list[Match]:
    """Step-match `mot_run` against `dense_run`; writes compare.json, compare.md and compare.png into `out`."""
    dense, mot = _load(dense_run), _load(mot_run)
    keys = modalities(dense, mot)
    if not keys:
        raise ConfigError(f"no per-modality loss (loss/...) is logged by both {dense_run} and {mot_run}")
    curves = {k: (curve(dense, k), curve(mot, k)) for k in keys}
    curves = {k: pair for k, pair in curves.items() if pair[0].steps and pair[1].steps}
    if not curves:
        raise ConfigError(f"the common losses {keys} have no finite values in one of the runs")
    matches = [match(k.removeprefix("loss/"), *pair) for k, pair in curves.items()]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {"dense": str(dense_run), "mot": str(mot_run)}
    (out / "compare.json").write_text(
        json.dumps({"runs": runs, "matches": [asdict(m) for m in matches]}, indent=2)
    )
    (out / "compare.md").write_text(markdown(matches, runs))
    plot(curves, matches, out / "compare.png")
    return matches


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown(matches: list[Match], runs: dict[str, str]) -> str:
    lines = [
        f"Step matching: MoT run `{runs['mot']}` against dense run `{runs['dense']}`.",
        "",
        "| modality | dense final loss | dense steps | MoT step to match | steps | FLOPs | wall-clock |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in matches:
        step = str(m.mot_step) if m.reached else "not reached"
        lines.append(
            f"| {m.modality} | {m.dense_final_loss:.4f} | {m.dense_steps} | {step} | "
            f"{_pct(m.step_fraction)} | {_pct(m.flops_fraction)} | {_pct(m.time_fraction)} |"
        )
    lines += ["", "Fractions are of the dense run's total; losses are EMA-smoothed (weight 0.9)."]
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, tuple[Curve, Curve]], matches: list[Match], path: Path) -> None:
    """One panel per modality: both smoothed curves against step, the dense target and the match marked."""
    fig, axes = plt.subplots(1, len(matches), figsize=(5 * len(matches), 3.6), squeeze=False)
    for ax, (key, (dense, mot)), m in zip(axes[0], curves.items(), matches):
        ax.plot(dense.steps, dense.smoothed, label="dense")
        ax.plot(mot.steps, mot.smoothed, label="MoT")
        ax.axhline(m.dense_final_loss, color="gray", linestyle=":", linewidth=0.8)
        if m.reached:
            ax.plot(
                [m.mot_step],
                [m.dense_final_loss],
                "k*",
                markersize=10,
                label=f"match: step {m.mot_step} ({_pct(m.step_fraction)})",
            )
        style_axes(ax, key, "step")
    save_figure(fig, path)
