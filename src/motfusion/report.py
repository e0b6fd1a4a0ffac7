"""What a person looks at after a run: loss curves, a sample grid, captions, and an HTML page."""

from __future__ import annotations

import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from motfusion.data.images import to_pil
from motfusion.training.logging import METRICS_FILE  # noqa: E402
from motfusion.training.logging import read_metrics as _read_records

X_LABELS = {"step": "step", "cumulative_flops": "training FLOPs"}


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (one cut short by a kill mid-write is dropped)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: expected the {METRICS_FILE} of a training run")
    return _read_records(path)


def loss_keys(history: list[dict]) -> tuple[str, ...]:
    """The per-modality training losses in a run's records, in order: loss/text, loss/image, ..."""
    return tuple(dict.fromkeys(k for r in history for k in r if k.startswith("loss/")))


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, as TensorBoard draws it."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)))
    return out


def plot_losses(
    runs: dict[str, list[dict]],
    path: Path,
    keys: tuple[str, ...] = ("loss/text", "loss/image"),
    x_axes: tuple[str, ...] = ("step",),
) -> None:
    """One panel per modality loss (columns) and x axis (rows: "step", "cumulative_flops"); one line
    per run (raw, faint, and smoothed). Skipped steps' non-finite losses are left out."""
    fig, axes = plt.subplots(
        len(x_axes), len(keys), figsize=(5 * len(keys), 3.6 * len(x_axes)), squeeze=False
    )
    for row, x in zip(axes, x_axes):
        for ax, key in zip(row, keys):
            for name, rows in runs.items():
                pts = [(r[x], r[key]) for r in rows if key in r and x in r and math.isfinite(r[key])]
                if not pts:
                    continue
                xs, vals = zip(*pts)
                (line,) = ax.plot(xs, smooth(list(vals)), label=name)
                ax.plot(xs, vals, color=line.get_color(), alpha=0.25, linewidth=0.8)
            style_axes(ax, key, X_LABELS.get(x, x), "linear" if x == "step" else "log")
    save_figure(fig, path)


def style_axes(ax: plt.Axes, title: str, xlabel: str, xscale: str = "linear") -> None:
    """A loss panel: log-scale losses, a light grid, the legend."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_xscale(xscale)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()


def save_figure(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_runs(run_dirs: list[Path], path: Path) -> tuple[str, ...]:
    """Per-modality loss curves of several runs against steps and against training FLOPs, in one PNG.
    Returns the loss keys drawn (one column each)."""
    runs = {str(d): read_metrics(Path(d) / METRICS_FILE) for d in run_dirs}
    keys = loss_keys([r for rows in runs.values() for r in rows])
    if not keys:
        raise FileNotFoundError(
            f"no per-modality losses (loss/...) found in the metrics of {', '.join(runs)}"
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    plot_losses(runs, path, keys, x_axes=("step", "cumulative_flops"))
    return keys


def display_scale(image_size: int, target: int = 128) -> int:
    """The whole-number upscaling that shows an image at about `target` pixels (nearest neighbour)."""
    return max(1, round(target / image_size))


def sample_grid(prompts: list[str], images: list[list[torch.Tensor]], path: Path, scale: int = 3) -> None:
    """Rows of samples, one row per prompt, the prompt written on the left."""
    from PIL import ImageDraw

    tiles = [[to_pil(im, scale) for im in row] for row in images]
    tile = tiles[0][0].size[0]
    measure = ImageDraw.Draw(PILImage.new("RGB", (1, 1)))
    pad, label_w = 4, int(max(measure.textlength(p) for p in prompts)) + 16
    cols = max(len(r) for r in tiles)
    sheet = PILImage.new("RGB", (label_w + cols * (tile + pad), len(tiles) * (tile + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (prompt, row) in enumerate(zip(prompts, tiles)):
        y = pad + r * (tile + pad)
        draw.text((6, y + tile // 2 - 6), prompt, fill="black")
        for c, pic in enumerate(row):
            sheet.paste(pic, (label_w + c * (tile + pad), y))
    sheet.save(path)


def _mark(ok: bool) -> str:
    return "&#10003;" if ok else "&#10007;"  # a check mark, or a cross


def write_html(
    out: Path,
    title: str,
    metrics: dict,
    t2i: list[dict],
    i2t: list[dict],
    forms: dict[str, float] | None = None,
    edits: list[dict] | None = None,
    speech: dict[str, list[dict]] | None = None,
) -> Path:
    """index.html beside loss.png and samples.png; t2i rows: {prompt, files, ok}; i2t: {file, truth, caption, ok};
    `forms`: geneval per caption form; `edits` rows: {instruction, files (source, output, target), ok};
    `speech`: {"tts": [{prompt, file, heard, ok}], "stt": [{file, truth, transcript, ok}]}, audio files."""
    esc = html.escape
    summary = "".join(
        f"<tr><td>{esc(k)}</td><td>{v:.4g}</td></tr>"
        if isinstance(v, float)
        else f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>"
        for k, v in metrics.items()
    )
    gen = "".join(
        f"<tr><td>{_mark(r['ok'])} {esc(r['prompt'])}</td><td>"
        + "".join(f"<img src='{esc(f)}'>" for f in r["files"])
        + "</td></tr>"
        for r in t2i
    )
    per_form = "".join(f"<tr><td>{esc(k)}</td><td>{v:.3f}</td></tr>" for k, v in (forms or {}).items())
    cap = "".join(
        f"<tr><td><img src='{esc(r['file'])}'></td><td>{esc(r['truth'])}</td><td>{_mark(r['ok'])} {esc(r['caption'])}</td></tr>"
        for r in i2t
    )
    edit_rows = "".join(
        f"<tr><td>{_mark(r['ok'])} {esc(r['instruction'])}</td><td>"
        + "".join(f"<img src='{esc(f)}'>" for f in r["files"])
        + "</td></tr>"
        for r in edits or []
    )
    editing = (
        "<h2>Image editing</h2><p>Held-out edits: instruction (&#10003; when the scene checker reads the output "
        f"as exactly the target scene); source, output, target.</p><table>{edit_rows}</table>"
        if edits
        else ""
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td{{padding:4px 10px;vertical-align:middle}}
img{{image-rendering:pixelated;margin:2px}} table{{border-collapse:collapse}} tr:nth-child(even){{background:#f4f4f4}}</style>
</head><body><h1>{esc(title)}</h1>
<h2>Samples</h2><p>Held-out prompts, six samples each.</p><img src="samples.png">
<h2>geneval per caption form</h2><p>Share of prompts whose first sample the scene checker reads as
satisfying every clause of the prompt.</p><table>{per_form}</table>
<h2>Metrics</h2><table>{summary}</table>
<h2>Loss per modality</h2><img src="loss.png">
<h2>Text to image</h2><p>Prompt (&#10003; when the scene checker finds every clause in the first sample) and samples.</p><table>{gen}</table>
<h2>Image to text</h2><p>Held-out image, its true caption, the model's caption (&#10003; when all its clauses match the scene).</p>
<table><tr><th>image</th><th>true caption</th><th>generated</th></tr>{cap}</table>
{editing}
{speech_section(speech) if speech else ""}
</body></html>"""
    path = out / "index.html"
    path.write_text(page)
    return path


def speech_section(speech: dict[str, list[dict]]) -> str:
    """The page's speech part: text to speech with the judge's reading, speech to text."""
    esc = html.escape
    player = lambda f: f"<audio controls preload='none' src='{esc(f)}'></audio>"
    tts = "".join(
        f"<tr><td>{esc(r['prompt'])}</td><td>{player(r['file'])}</td><td>{_mark(r['ok'])} {esc(r['heard'])}</td></tr>"
        for r in speech["tts"]
    )
    stt = "".join(
        f"<tr><td>{player(r['file'])}</td><td>{esc(r['truth'])}</td><td>{_mark(r['ok'])} {esc(r['transcript'])}</td></tr>"
        for r in speech["stt"]
    )
    said = (
        "<h2>Text to speech</h2><p>Held-out prompt, the model's speech (units decoded by the codec), and "
        "what the ASR judge (a separate recogniser trained on real espeak-ng audio) hears in it "
        "(&#10003; when every word is right).</p><table><tr><th>prompt</th><th>speech</th><th>judge hears</th></tr>"
        f"{tts}</table>"
        if tts
        else ""
    )
    return (
        f"{said}<h2>Speech to text</h2><p>Held-out espeak-ng recording, its text, the model's transcript "
        "(&#10003; when every word is right).</p><table><tr><th>speech</th><th>text</th><th>transcript</th></tr>"
        f"{stt}</table>"
    )
