"""fp32 against bf16 autocast for the demo recipe's train step, on this CPU and on the instruction
sets of older ones: the measurements behind train.precision=auto (training/parallelize.py).

    python benchmarks/precision.py [--repeats 4] [--warmup 1] [--threads 2] [--out benchmarks/results]

One optimizer update of the demo recipe (forward, Transfusion loss, backward, clipping, AdamW) on
the same packed batches, blocks of fp32 and bf16 steps in turn in one process, so load on the host
hits both alike. Each instruction-set row runs in a child process with ONEDNN_MAX_CPU_ISA set (oneDNN, which
runs the convolutions and most matmuls on CPU, reads it once when it loads): AMX (Sapphire Rapids
and later), AVX512-BF16 (bf16 dot products, no tiles), AVX-512 and AVX2 (no bf16 instructions).
A row can only be as new as this CPU. Writes OUT/precision.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from motfusion.training.parallelize import resolve_precision

sys.path.insert(0, str(Path(__file__).parent))
from bench import machine, setup  # noqa: E402

# oneDNN's names, newest first; "" leaves oneDNN the whole CPU
ISAS = {"AMX": "", "AVX512-BF16": "AVX512_CORE_BF16", "AVX-512": "AVX512_CORE", "AVX2": "AVX2"}
BATCHES = 4


def measure(warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of a demo-recipe train step in fp32 and in bf16: blocks of BATCHES steps (the setup
    rotates through its batches), one block of each precision in turn (step by step alternation read
    bf16 faster than whole runs do)."""
    step = setup("demo", [], batches=BATCHES).step
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for block in range(warmup + repeats):
        for precision, kept in times.items():
            for _ in range(BATCHES):
                start = time.perf_counter()
                step(precision)
                if block >= warmup:
                    kept.append(time.perf_counter() - start)
    return {precision: 1e3 * statistics.median(kept) for precision, kept in times.items()}


def child(isa: str, warmup: int, repeats: int, threads: int) -> dict:
    """One row, measured in a fresh process with oneDNN limited to `isa`."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": ISAS[isa]} if ISAS[isa] else dict(os.environ)
    args = [sys.executable, __file__, "--child", "--warmup", str(warmup), "--repeats", str(repeats)]
    out = subprocess.run([*args, "--threads", str(threads)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{isa}: {out.stderr.strip().splitlines()[-1]}")
    ms = json.loads(out.stdout.strip().splitlines()[-1])
    return {"isa": isa, **ms, "bf16_over_fp32": round(ms["bf16"] / ms["fp32"], 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps({k: round(v, 1) for k, v in measure(args.warmup, args.repeats).items()}))
        return
    amx = torch.cpu._is_amx_tile_supported()
    rows = [child(isa, args.warmup, args.repeats, args.threads) for isa in ISAS if amx or isa != "AMX"]
    auto = resolve_precision("auto", torch.device("cpu"))
    header = {"machine": machine(), "amx": amx, "auto_on_this_cpu": auto, "threads": args.threads}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps({**header, "results": rows}, indent=2) + "\n")
    print(
        f"demo recipe train step, {args.threads} threads, medians of {args.repeats * BATCHES}; auto here: {auto}\n"
    )
    print("| oneDNN instruction set | fp32 ms | bf16 ms | bf16 / fp32 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['isa']} | {r['fp32']:.0f} | {r['bf16']:.0f} | {r['bf16_over_fp32']:.2f} |")


if __name__ == "__main__":
    main()
