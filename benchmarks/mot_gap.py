"""Where a MoT train step's extra time goes, against dense at equal FLOPs per token (issue 12's
target 1, MoT / dense <= 1.05, which `make bench` does not meet at 4 and 16 rows of 192 positions).

    python benchmarks/mot_gap.py [--threads 1,2] [--batch-sizes 4,16,64] [--repeats 20] [--out benchmarks/results]

bench.py's setup: the debug recipe widened to dims 64, 128 and 256, every component untied (MoT)
or none (dense), two modalities (text, image) or three (and speech). Three tables:

1. MoT / dense step time against the tokens per step, at each --threads: whole steps, dense and
   MoT in turn in one process (bench.interleaved_ms; max(8, 4 * repeats / rows) of each).
2. bench.py's worst case (three modalities, the first --batch-sizes, the last --threads) at dims
   64 and 256, the step in parts, each timed alone the same way: forward + backward (gradients set
   to None first, as a step does), gradient clipping, the optimizer's update (fused AdamW), the
   whole step (3 * repeats of each).
3. The same case's matmuls in forward + backward (torch.profiler; the median of 20 passes, the
   models in turn), grouped by the number of tokens they run over: a matmul's rows for forward and
   for the input's gradient, its reduction dimension for the weight's gradient. Dense runs the
   backbone's matmuls on all the batch's tokens, MoT on each tower's share; the adapters' and
   heads' matmuls (the same in both) fall under their own token counts. GFLOP/s: 2 M K N / time.

Writes OUT/mot_gap.json and OUT/mot_gap.md (the tables).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).parent))
from bench import THREE_TOWERS, Setup, interleaved_ms, machine, setup  # noqa: E402

MODELS = {"dense": "", "MoT": "ffn,attn,norm"}
DIMS = (64, 128, 256)
PARTS_DIMS = (64, 256)
PASSES = 20  # profiled forward + backward passes per model


def setups(dim: int, modalities: int, batch_size: int) -> dict[str, Setup]:
    three = THREE_TOWERS if modalities == 3 else ()
    overrides = [f"model.dim={dim}", f"train.batch_size={batch_size}", *three]
    return {name: setup("debug", [*overrides, f"model.untie={u}"], modalities) for name, u in MODELS.items()}


def step_ratio(dim: int, modalities: int, batch_size: int, repeats: int) -> dict:
    """MoT / dense whole-step time, one step of each in turn."""
    runs = setups(dim, modalities, batch_size)
    ms = interleaved_ms({name: s.step for name, s in runs.items()}, 1, max(8, 4 * repeats // batch_size))
    tokens = runs["dense"].batches[0].tokens.numel()
    return {"dim": dim, "modalities": modalities, "rows": batch_size, "tokens": tokens, "step_ms": ms}


def tower_sizes(s: Setup) -> tuple[int, ...]:
    """How many of the batch's tokens each tower serves (one tower, all of them, when dense)."""
    batch = s.batches[0]
    route = s.model.backbone.route(batch.modality_index)
    return (batch.tokens.numel(),) if route is None else route.sizes


def parts_ms(runs: dict[str, Setup], repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of forward + backward, clipping, the optimizer and the whole step, per model."""
    fns = {}
    for name, s in runs.items():
        params = list(s.model.parameters())
        fns[name, "forward + backward"] = s.forward_backward
        fns[name, "gradient clipping"] = lambda p=params: torch.nn.utils.clip_grad_norm_(p, math.inf)
        fns[name, "optimizer update"] = s.optimizer.step
        fns[name, "whole step"] = s.step
    ms = interleaved_ms(fns, 3, 3 * repeats)
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for (name, part), v in ms.items():
        out[part][name] = v
    return dict(out)


def matmul_pass(s: Setup, tokens: set[int]) -> dict[int, dict[str, float]]:
    """One forward + backward's aten::mm calls, grouped by the token count they run over."""
    with profile(record_shapes=True) as prof:
        s.forward_backward()
    groups: dict[int, dict[str, float]] = defaultdict(lambda: {"calls": 0, "ms": 0.0, "gflop": 0.0})
    for e in prof.events():
        if e.name != "aten::mm":
            continue
        (m, k), (_, n) = e.input_shapes[:2]
        # Tokens are a forward's or an input gradient's rows, a weight gradient's reduction.
        g = groups[m if m in tokens else k if k in tokens else min(m, k)]
        g["calls"] += 1
        g["ms"] += e.cpu_time_total / 1e3
        g["gflop"] += 2 * m * k * n / 1e9
    return groups


def matmuls_by_tokens(runs: dict[str, Setup], sizes: dict[str, tuple[int, ...]]) -> dict[str, dict]:
    """Per model and token count: calls and GFLOP per pass, and the median ms over PASSES passes
    (the models in turn, so that load on the host hits both alike)."""
    passes: dict[str, list] = {name: [] for name in runs}
    for _ in range(PASSES):
        for name, s in runs.items():
            passes[name].append(matmul_pass(s, set(sizes[name])))
    out = {}
    for name, ps in passes.items():
        groups = sorted(ps[0], reverse=True)
        out[name] = {
            rows: {**ps[0][rows], "ms": statistics.median(p[rows]["ms"] for p in ps)} for rows in groups
        }
    return out


def decompose(dim: int, batch_size: int, repeats: int) -> dict:
    """Tables 2 and 3 for three modalities at `dim`."""
    runs = setups(dim, 3, batch_size)
    sizes = {name: tower_sizes(s) for name, s in runs.items()}
    return {
        "dim": dim,
        "batch": f"{batch_size}x{runs['dense'].cfg.train.seq_len}",
        "tower_tokens": sizes,
        "parts_ms": parts_ms(runs, repeats),
        "matmuls": matmuls_by_tokens(runs, sizes),
    }


def parts_lines(rows: list[dict]) -> list[str]:
    lines = ["| dim | part | dense ms | MoT ms | MoT - dense ms | MoT / dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        for part, ms in r["parts_ms"].items():
            d, m = ms["dense"], ms["MoT"]
            lines.append(f"| {r['dim']} | {part} | {d:.2f} | {m:.2f} | {m - d:+.2f} | {m / d:.2f} |")
    return lines


def matmul_lines(rows: list[dict]) -> list[str]:
    lines = ["| dim | model | tokens | calls | ms | GFLOP/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        for name, groups in r["matmuls"].items():
            total_ms = sum(g["ms"] for g in groups.values())
            total_gflop = sum(g["gflop"] for g in groups.values())
            for tokens, g in groups.items():
                lines.append(
                    f"| {r['dim']} | {name} | {tokens} | {g['calls']:.0f} | {g['ms']:.2f} | "
                    f"{g['gflop'] / g['ms'] * 1e3:.0f} |"
                )
            lines.append(
                f"| {r['dim']} | {name} | **all** | | **{total_ms:.2f}** | **{total_gflop / total_ms * 1e3:.0f}** |"
            )
    return lines


def ratio_lines(rows: list[dict], batch_sizes: list[int]) -> list[str]:
    """One line per (threads, modalities, dim), one MoT / dense column per batch size."""
    head = " | ".join(f"{b} x 192" for b in batch_sizes)
    lines = [f"| threads | modalities | dim | {head} |", "|---|---|---|" + "---|" * len(batch_sizes)]
    cells: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        cells[r["threads"], r["modalities"], r["dim"]][r["rows"]] = r
    for (threads, modalities, dim), by_rows in cells.items():
        ratios = [by_rows[b]["step_ms"]["MoT"] / by_rows[b]["step_ms"]["dense"] for b in batch_sizes]
        lines.append(f"| {threads} | {modalities} | {dim} | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    worst = [
        max(r["step_ms"]["MoT"] / r["step_ms"]["dense"] for r in rows if r["rows"] == b) for b in batch_sizes
    ]
    lines.append("| **worst** | | | " + " | ".join(f"**{x:.2f}**" for x in worst) + " |")
    return lines


def markdown(result: dict) -> str:
    ratios, parts = result["ratios"], result["parts"]
    batch_sizes = sorted({r["rows"] for r in ratios})
    tokens = parts[0]["tower_tokens"]["MoT"]
    m = result["machine"]
    return "\n".join(
        [
            "# MoT's extra cost per step (benchmarks/mot_gap.py)",
            "",
            f"Command: `{result['command']}`",
            "",
            f"Machine: {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, load average "
            f"{m['load_avg_1_5_15']} at the start.",
            "",
            "## 1. MoT / dense step time against the tokens per step (rows of 192 positions)",
            "",
            *ratio_lines(ratios, batch_sizes),
            "",
            f"## 2. The step in parts: three modalities, {parts[0]['batch']} positions, "
            f"{result['parts_threads']} threads (MoT's towers: {tokens} tokens)",
            "",
            *parts_lines(parts),
            "",
            "## 3. Forward + backward's matmuls by the tokens they run over (torch.profiler)",
            "",
            *matmul_lines(parts),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batch-sizes", default="4,16,64", help="rows of 192 positions per step")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    result: dict = {"command": shlex.join(["python", *sys.argv]), "machine": machine(), "ratios": []}
    for n, modalities, dim, rows in itertools.product(threads, (2, 3), DIMS, batch_sizes):
        torch.set_num_threads(n)
        result["ratios"].append(r := {"threads": n, **step_ratio(dim, modalities, rows, args.repeats)})
        ms = r["step_ms"]
        print(
            f"{n} threads, {modalities} modalities, dim {dim}, {rows} rows: MoT / dense {ms['MoT'] / ms['dense']:.2f}"
        )
    torch.set_num_threads(threads[-1])
    result["parts_threads"] = threads[-1]
    result["parts"] = [decompose(dim, batch_sizes[0], args.repeats) for dim in PARTS_DIMS]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mot_gap.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "mot_gap.md").write_text(markdown(result))
    print(f"wrote {args.out}/mot_gap.json and mot_gap.md")


if __name__ == "__main__":
    main()
