"""The tables of docs/RESULTS.md, from the runs of benchmarks/reproduce.sh.

    python benchmarks/summarize.py [--runs runs/repro] > tables.md

Reads each run's config.json, metrics.jsonl (final losses: EMA-smoothed as in `motfusion compare`),
eval_*.json (written by `motfusion eval`) and the compare-*/compare.json step matches. A run or an
evaluation that is missing shows as "-".
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from motfusion.compare import curve
from motfusion.report import read_metrics


def final_loss(run: Path, key: str) -> float | None:
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    c = curve(read_metrics(path), key)
    return c.smoothed[-1] if c.smoothed else None


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def fmt(x: object, digits: int = 3) -> str:
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.{digits}f}"
    return "-" if x is None else str(x)


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def run_info(run: Path) -> tuple[int | None, float | None]:
    """Steps and seconds of training, from the last metrics record."""
    path = run / "metrics.jsonl"
    records = read_metrics(path) if path.exists() else []
    if not records:
        return None, None
    return records[-1]["step"], records[-1].get("elapsed_s")


def shapes_rows(root: Path, runs: list[tuple[str, str]]) -> list[list[object]]:
    rows = []
    for name, label in runs:
        run = root / name
        e = load(run / "eval_shapes.json")
        steps, _ = run_info(run)
        params = _params(run) if (run / "config.json").exists() else None
        rows.append(
            [
                label,
                params,
                steps,
                final_loss(run, "loss/text"),
                final_loss(run, "loss/image"),
                e.get("val_loss/text"),
                e.get("val_loss/image"),
                e.get("geneval_single"),
                e.get("geneval"),
                e.get("caption_accuracy"),
                e.get("caption_accuracy_single"),
            ]
        )
    return rows


def _params(run: Path) -> str:
    from motfusion.config import Config
    from motfusion.models.transfusion import TransfusionModel
    from motfusion.tokenizer import vocab_size

    cfg = Config.from_dict(load(run / "config.json"))
    cfg.model.vae = cfg.model.vq = ""  # the parameter count needs neither
    model = TransfusionModel(cfg.model, vocab_size(cfg.data.tokenizer))
    return f"{model.num_params() / 1e6:.2f}M"


SHAPES_HEADER = [
    "run",
    "params",
    "steps",
    "train text",
    "train image",
    "val text",
    "val image",
    "geneval_single",
    "geneval",
    "caption_acc",
    "caption_acc_single",
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/repro"))
    root = p.parse_args(argv).runs
    out = []

    out += ["### MoT vs dense: step matching", ""]
    rows = []
    for name in ("compare-mot-dense", "compare-mot-untie-ffn", "compare-speech-mot-dense"):
        for m in load(root / name / "compare.json").get("matches", []):
            rows.append(
                [
                    name.removeprefix("compare-"),
                    m["modality"],
                    m["dense_final_loss"],
                    m["mot_step"],
                    m["dense_steps"],
                    m["step_fraction"],
                    m["flops_fraction"],
                    m["time_fraction"],
                ]
            )
    out += [
        table(
            [
                "comparison",
                "modality",
                "baseline final loss",
                "MoT step to match",
                "baseline steps",
                "steps",
                "FLOPs",
                "wall-clock",
            ],
            rows,
        ),
        "",
    ]

    out += ["### Shapes runs (small recipe, 2000 steps)", ""]
    out += [
        table(
            SHAPES_HEADER,
            shapes_rows(
                root,
                [
                    ("mot", "MoT (ffn+attn+norm)"),
                    ("dense", "dense"),
                    ("untie-ffn", "untie ffn"),
                    ("untie-ffn-attn", "untie ffn+attn"),
                    ("causal", "MoT, causal image attention"),
                    ("nocap", "MoT, no image-first noise cap"),
                    ("align", "MoT + contrastive (0.1)"),
                    ("chameleon", "MoT, Chameleon (VQ tokens)"),
                    ("speech", "MoT, 3 towers with speech"),
                    ("speech-dense", "dense, with speech"),
                    ("loo-text-image", "towers text+image, speech"),
                    ("loo-image-speech", "towers text, image+speech"),
                ],
            ),
        ),
        "",
    ]

    out += ["### Fashion-MNIST (latents, U-Net patcher)", ""]
    e = load(root / "fashion" / "eval_fashion.json")
    keys = ["fid_fashion_classifier", "class_accuracy", "clip_score_motfusion", "caption_accuracy"]
    out += [
        table(
            ["", *keys],
            [
                ["generated", *(e.get(k) for k in keys)],
                ["real val images", *(e.get(f"{k}/real") for k in keys)],
            ],
        ),
        "",
    ]
    out += [
        f"val loss text {fmt(e.get('val_loss/text'))}, image {fmt(e.get('val_loss/image'))}; "
        f"n = {fmt(e.get('n'))} generated images, {fmt(e.get('n_reference'))} reference images.",
        "",
    ]

    out += ["### Speech (three modalities)", ""]
    keys = [
        "speech_cer",
        "speech_unit_accuracy",
        "speech_length_ratio",
        "val_loss/speech",
        "val_loss/text",
        "val_loss/image",
        "speech_n",
    ]
    rows = [
        [name, *(load(root / name / "eval_speech.json").get(k) for k in keys)]
        for name in ("speech", "speech-dense", "loo-text-image", "loo-image-speech")
    ]
    out += [table(["run", *keys], rows), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
