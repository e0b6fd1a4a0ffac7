"""Speed benchmarks on the host: MoT vs dense train steps, and the Transfusion mask vs causal attention.

    python benchmarks/bench.py [--repeats N] [--threads N] [--out benchmarks/results]

1. Train step: one optimizer update (forward, Transfusion loss, backward, AdamW) of the debug recipe
   widened to several model dims, on one packed text+image batch of the shapes data, with every
   component untied per modality (MoT) and with none (dense). Both spend the same FLOPs per token
   (the FLOP counter's figure is written beside the times); MoT has ~2x the backbone parameters.
2. Attention: scaled_dot_product_attention (sdpa backend) forward + backward with the Transfusion
   mask (documents, causal text, bidirectional images) as a dense boolean mask, against plain causal
   attention (`is_causal=True`), at several sequence lengths.

Every figure is the median of `--repeats` timed runs after `--warmup` untimed ones. Results go to
OUT/train_step.json, OUT/attention.json and OUT/README.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from motfusion.config import get_recipe
from motfusion.data.pipeline import make_packer
from motfusion.models.attention import SeqMeta, dense_mask
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.tokenizer import build_tokenizer
from motfusion.training.flops import FlopCounter
from motfusion.training.trainer import build_optimizer, train_step

DIMS = (64, 128, 256)
SEQ_LENS = (256, 512, 1024, 2048)
HEADS, HEAD_DIM = 4, 32
DOC_LEN, IMAGE_PATCHES = 256, 64  # attention benchmark: each document is text, one image, text


def median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_train_step(dim: int, untie: str, warmup: int, repeats: int) -> dict:
    """Median ms of one optimizer update of the debug recipe at width `dim`; untie "" is dense."""
    cfg = get_recipe("debug").override([f"model.dim={dim}", f"model.untie={untie}"])
    tok = build_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size)
    objective = TransfusionObjective(cfg.objective)
    optimizer = build_optimizer(model, cfg.train)
    batch = make_packer(cfg, tok).next_batch()
    flops = FlopCounter(model).count(batch)
    generator = torch.Generator().manual_seed(0)
    step = lambda: train_step(model, objective, optimizer, batch, generator, cfg.train.lr, cfg.train.grad_clip)
    return {"dim": dim, "model": "MoT" if untie else "dense", "untie": untie,
            "params": model.num_params(), "non_embedding_params": model.num_params(non_embedding=True),
            "flops_per_token": {k: round(v) for k, v in flops.per_token().items()},
            "batch": f"{cfg.train.batch_size}x{cfg.train.seq_len}",
            "median_ms": median_ms(step, warmup, repeats)}


def transfusion_meta(seq_len: int) -> SeqMeta:
    """(1, T) metadata: documents of DOC_LEN positions, each text, then an image of IMAGE_PATCHES, then text."""
    pos = torch.arange(seq_len)
    within = pos % DOC_LEN
    start = (DOC_LEN - IMAGE_PATCHES) // 2
    in_image = (within >= start) & (within < start + IMAGE_PATCHES)
    doc = pos // DOC_LEN
    image = torch.where(in_image, doc, torch.full_like(doc, -1))
    return SeqMeta(doc=doc[None], image=image[None], index=pos[None])


def bench_attention(seq_len: int, warmup: int, repeats: int) -> dict:
    """Median ms of sdpa forward + backward with the Transfusion mask and with is_causal, and of the mask build."""
    q, k, v = (torch.randn(1, HEADS, seq_len, HEAD_DIM, requires_grad=True) for _ in range(3))
    meta = transfusion_meta(seq_len)
    mask = dense_mask(meta, meta, bidirectional=True)  # (1, 1, T, T)

    def run(**kwargs: object) -> Callable[[], None]:
        return lambda: F.scaled_dot_product_attention(q, k, v, **kwargs).sum().backward()

    return {"seq_len": seq_len, "heads": HEADS, "head_dim": HEAD_DIM,
            "transfusion_mask_ms": median_ms(run(attn_mask=mask), warmup, repeats),
            "causal_ms": median_ms(run(is_causal=True), warmup, repeats),
            "mask_build_ms": median_ms(lambda: dense_mask(meta, meta, bidirectional=True), warmup, repeats)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform()}


def write_results(out: Path, header: dict, train: list[dict], attention: list[dict], note: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train_step", train), ("attention", attention)):
        (out / f"{name}.json").write_text(json.dumps({**header, "note": note, "results": rows}, indent=2) + "\n")
    (out / "README.md").write_text(markdown(header, train, attention, note))


def markdown(header: dict, train: list[dict], attention: list[dict], note: str) -> str:
    m = header["machine"]
    lines = ["# Benchmark results", "", f"Command: `{header['command']}`", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, {m['threads']} thread(s), "
             f"load average {m['load_avg_1_5_15']} at the start.", "",
             f"Medians of {header['repeats']} runs after {header['warmup']} warmup runs.", ""]
    if note:
        lines += [f"**Note:** {note}", ""]
    lines += ["## Train step: MoT vs dense (equal FLOPs per token)", "",
              "| dim | model | params | FLOPs/token (text, image) | batch | step ms | MoT / dense |",
              "|---|---|---|---|---|---|---|"]
    dense = {r["dim"]: r["median_ms"] for r in train if r["model"] == "dense"}
    for r in train:
        f = r["flops_per_token"]
        lines.append(f"| {r['dim']} | {r['model']} | {r['params'] / 1e6:.2f}M | {f.get('text', 0):,} / "
                     f"{f.get('image', 0):,} | {r['batch']} | {r['median_ms']:.1f} | "
                     f"{r['median_ms'] / dense[r['dim']]:.2f} |")
    lines += ["", "## Attention (sdpa, forward + backward): Transfusion mask vs causal", "",
              f"B=1, {HEADS} heads of {HEAD_DIM}; documents of {DOC_LEN} positions with one image of "
              f"{IMAGE_PATCHES} patches each.", "",
              "| seq len | Transfusion mask ms | causal ms | ratio | mask build ms |", "|---|---|---|---|---|"]
    for r in attention:
        lines.append(f"| {r['seq_len']} | {r['transfusion_mask_ms']:.2f} | {r['causal_ms']:.2f} | "
                     f"{r['transfusion_mask_ms'] / r['causal_ms']:.2f} | {r['mask_build_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared host)")
    p.add_argument("--note", default="", help="a remark written into the results, e.g. that the host was busy")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    header = {"command": shlex.join(["python", *sys.argv]), "machine": machine(),
              "repeats": args.repeats, "warmup": args.warmup}
    train = []
    for dim in DIMS:
        for untie in ("", "ffn,attn,norm"):
            train.append(bench_train_step(dim, untie, args.warmup, args.repeats))
            print(f"train step dim {dim} {train[-1]['model']}: {train[-1]['median_ms']:.1f} ms", flush=True)
    attention = []
    for seq_len in SEQ_LENS:
        attention.append(bench_attention(seq_len, args.warmup, args.repeats))
        print(f"attention T={seq_len}: mask {attention[-1]['transfusion_mask_ms']:.2f} ms, "
              f"causal {attention[-1]['causal_ms']:.2f} ms", flush=True)
    write_results(args.out, header, train, attention, args.note)
    print(f"wrote {args.out}/train_step.json, attention.json, README.md")


if __name__ == "__main__":
    main()
