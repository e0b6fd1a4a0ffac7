"""Speed and memory benchmarks on the host: MoT vs dense train steps, the Transfusion mask vs causal
attention, and sampling with and without the KV cache.

    python benchmarks/bench.py [--repeats N] [--threads N] [--out benchmarks/results]

1. Train step: one optimizer update (forward, Transfusion loss, backward, AdamW) of the debug recipe
   widened to several model dims, on one packed batch, with every component untied per modality
   (MoT) and with none (dense). Two modalities: text+image documents of the shapes data. Three: the
   same plus text+speech documents (random units, 2 per caption character as at
   25 Hz for speech of about 12 characters a second, at most 96) and a speech
   tower. MoT and dense spend the same FLOPs per token (the FLOP counter's figure is written beside
   the times); MoT has ~M x the backbone parameters. Memory per configuration: on CUDA the peak
   allocated; on CPU (no allocator statistics) the bytes of the weights, gradients and AdamW states
   plus the activations autograd saves for backward, counted exactly with saved-tensor hooks.
2. Attention: scaled_dot_product_attention (sdpa backend) forward + backward with the Transfusion
   mask (documents, causal text, bidirectional images) as a dense boolean mask, against plain causal
   attention (`is_causal=True`), at several sequence lengths.
3. Sampling, with the demo recipe's model (random weights: speed does not depend on them): text to
   image (Euler, 20 steps, guidance 3) with the prompt's keys and values cached across denoising
   steps vs recomputed at every step; image to text, 32 greedy tokens per image, with the KV cache
   vs recomputing the whole sequence per token; each for a batch of 8 prompts vs the 8 one by one.

Every figure is the median of `--repeats` timed runs after `--warmup` untimed ones (sampling: fewer,
see SAMPLING_REPEATS). Results go to OUT/train_step.json, OUT/attention.json, OUT/sampling.json and
OUT/README.md with the command and the machine.
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

from motfusion.data.pipeline import make_packer
from motfusion.data.shapes import ShapesDataset
from motfusion.models.attention import SeqMeta, dense_mask
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.recipes import get_recipe
from motfusion.sampling.generate import Generator, SampleConfig
from motfusion.sequence import Batch, Image, Text, Units, pack_documents
from motfusion.tokenizer import build_tokenizer
from motfusion.training.flops import FlopCounter
from motfusion.training.trainer import build_optimizer, train_step

DIMS = (64, 128, 256)
SEQ_LENS = (256, 512, 1024, 2048)
HEADS, HEAD_DIM = 4, 32
DOC_LEN, IMAGE_PATCHES = 256, 64  # attention benchmark: each document is text, one image, text
THREE_TOWERS = ("model.towers=text:text,image:image,speech:speech", "model.vocab_sizes=speech:500")
SAMPLING_BATCH, SAMPLING_REPEATS = 8, 5


def median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def three_modality_batch(cfg, tok) -> Batch:
    """(B, T) rows of shapes text+image documents alternating with text+speech ones (speech first or second)."""
    shapes = ShapesDataset(image_size=cfg.data.image_size)
    g = torch.Generator().manual_seed(0)
    docs, i = [], 0
    while True:
        sample = shapes.sample(i)
        units = Units("speech", torch.randint(0, 500, (min(2 * len(sample.caption), 96),), generator=g))
        docs += [[Text(sample.caption), Image(sample.image)],
                 [units, Text(sample.caption)] if i % 2 else [Text(sample.caption), units]]
        batch = pack_documents(docs, tok, cfg.model.patch_size, cfg.train.seq_len)
        if batch.shape[0] > cfg.train.batch_size:
            return pack_documents(docs[:-2], tok, cfg.model.patch_size, cfg.train.seq_len)
        i += 1


def memory_mb(model: TransfusionModel, step: Callable[[], object], optimizer) -> dict:
    """Peak allocated on CUDA; on CPU: weights + gradients + AdamW states + activations saved for backward."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    states = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                 if torch.is_tensor(t))
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    out = {"weights_mb": params / 2**20, "grads_mb": params / 2**20, "adam_mb": states / 2**20,
           "saved_activations_mb": saved[0] / 2**20}
    out["total_mb"] = sum(out.values())
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def bench_train_step(dim: int, untie: str, modalities: int, warmup: int, repeats: int) -> dict:
    """Median ms of one optimizer update of the debug recipe at width `dim`; untie "" is dense."""
    overrides = [f"model.dim={dim}", f"model.untie={untie}", *(THREE_TOWERS if modalities == 3 else ())]
    cfg = get_recipe("debug").override(overrides)
    tok = build_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size)
    objective = TransfusionObjective(cfg.objective)
    optimizer = build_optimizer(model, cfg.train)
    batch = three_modality_batch(cfg, tok) if modalities == 3 else make_packer(cfg, tok).next_batch()
    flops = FlopCounter(model).count(batch)
    generator = torch.Generator().manual_seed(0)
    step = lambda: train_step(model, objective, optimizer, batch, generator, cfg.train.lr, cfg.train.grad_clip)
    ms = median_ms(step, warmup, repeats)
    return {"dim": dim, "modalities": modalities, "model": "MoT" if untie else "dense", "untie": untie,
            "params": model.num_params(), "non_embedding_params": model.num_params(non_embedding=True),
            "flops_per_token": {k: round(v) for k, v in flops.per_token().items()},
            "batch": f"{cfg.train.batch_size}x{cfg.train.seq_len}",
            "median_ms": ms, "memory": memory_mb(model, step, optimizer)}


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


def bench_sampling(warmup: int, repeats: int) -> list[dict]:
    """Text to image and image to text with the demo recipe's model: cache on/off, batched vs one by one."""
    cfg = get_recipe("demo").override(["data.tokenizer=bytes"])  # bpe:512 is trained with a run; speed is alike
    tok = build_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size).eval()
    shapes = ShapesDataset(image_size=cfg.data.image_size, split="val")
    samples = [shapes.sample(i) for i in range(SAMPLING_BATCH)]
    prompts = [s.caption for s in samples]
    images = torch.stack([s.image for s in samples])
    rows = []
    for cache in (True, False):
        gen = Generator(model, tok, cfg.objective, cfg.data.image_size,
                        SampleConfig(steps=20, guidance=3.0, max_tokens=32, use_cache=cache))

        def caption(idx: list[int]) -> int:
            """32 greedy tokens per image (no stop token, so every setting decodes the same count)."""
            return sum(map(len, gen.caption_ids(images[idx])))

        def draw(idx: list[int]) -> int:
            gen.images([prompts[i] for i in idx])
            return len(idx)

        for task, run, unit in (("text_to_image", draw, "images"), ("image_to_text", caption, "tokens")):
            for batched in (True, False):
                groups = [list(range(SAMPLING_BATCH))] if batched else [[i] for i in range(SAMPLING_BATCH)]
                made = [0]

                def go() -> None:
                    made[0] = sum(run(idx) for idx in groups)

                ms = median_ms(go, warmup, repeats)
                rows.append({"task": task, "kv_cache": cache, "batch": SAMPLING_BATCH if batched else 1,
                             "items": SAMPLING_BATCH, unit: made[0], "median_ms": ms,
                             f"{unit}_per_s": made[0] / (ms / 1e3)})
                print(f"sampling {task} cache={cache} batch={rows[-1]['batch']}: {ms:.0f} ms", flush=True)
    return rows


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform()}


def write_results(out: Path, header: dict, train: list[dict], attention: list[dict], sampling: list[dict],
                  note: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train_step", train), ("attention", attention), ("sampling", sampling)):
        (out / f"{name}.json").write_text(json.dumps({**header, "note": note, "results": rows}, indent=2) + "\n")
    (out / "README.md").write_text(markdown(header, train, attention, sampling, note))


def markdown(header: dict, train: list[dict], attention: list[dict], sampling: list[dict], note: str) -> str:
    m = header["machine"]
    lines = ["# Benchmark results", "", f"Command: `{header['command']}`", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, {m['threads']} thread(s), "
             f"load average {m['load_avg_1_5_15']} at the start.", "",
             f"Medians of {header['repeats']} runs after {header['warmup']} warmup runs.", ""]
    if note:
        lines += [f"**Note:** {note}", ""]
    lines += ["## Train step: MoT vs dense (equal FLOPs per token)", "",
              "Memory: weights + gradients + AdamW states + activations saved for backward (CPU; exact "
              "byte counts, not allocator peaks).", "",
              "| modalities | dim | model | params | FLOPs/token (text, image, speech) | batch | step ms | MoT / dense "
              "| memory MB (saved activations) |",
              "|---|---|---|---|---|---|---|---|---|"]
    dense = {(r["modalities"], r["dim"]): r["median_ms"] for r in train if r["model"] == "dense"}
    for r in train:
        f, mem = r["flops_per_token"], r["memory"]
        flops = " / ".join(f"{f[m]:,}" for m in ("text", "image", "speech") if m in f)
        lines.append(f"| {r['modalities']} | {r['dim']} | {r['model']} | {r['params'] / 1e6:.2f}M | {flops} | "
                     f"{r['batch']} | {r['median_ms']:.1f} | {r['median_ms'] / dense[r['modalities'], r['dim']]:.2f} | "
                     f"{mem['total_mb']:.1f} ({mem['saved_activations_mb']:.1f}) |")
    lines += ["", "## Attention (sdpa, forward + backward): Transfusion mask vs causal", "",
              f"B=1, {HEADS} heads of {HEAD_DIM}; documents of {DOC_LEN} positions with one image of "
              f"{IMAGE_PATCHES} patches each.", "",
              "| seq len | Transfusion mask ms | causal ms | ratio | mask build ms |", "|---|---|---|---|---|"]
    for r in attention:
        lines.append(f"| {r['seq_len']} | {r['transfusion_mask_ms']:.2f} | {r['causal_ms']:.2f} | "
                     f"{r['transfusion_mask_ms'] / r['causal_ms']:.2f} | {r['mask_build_ms']:.2f} |")
    lines += ["", "## Sampling: KV cache and batching (demo recipe's model, 16 px images of 16 patches)", "",
              f"{SAMPLING_BATCH} items per run: text to image is Euler with 20 steps and guidance 3 (two "
              "sequences per image); image to text decodes 32 greedy tokens per image.", "",
              "| task | KV cache | batch | ms for all items | items/s or tokens/s | cache speed-up | batching speed-up |",
              "|---|---|---|---|---|---|---|"]
    ms = {(r["task"], r["kv_cache"], r["batch"]): r["median_ms"] for r in sampling}
    for r in sampling:
        rate = r.get("images_per_s", r.get("tokens_per_s"))
        unit = "images/s" if "images_per_s" in r else "tokens/s"
        lines.append(f"| {r['task']} | {'on' if r['kv_cache'] else 'off'} | {r['batch']} | {r['median_ms']:.0f} | "
                     f"{rate:.1f} {unit} | {ms[r['task'], False, r['batch']] / r['median_ms']:.2f} | "
                     f"{ms[r['task'], r['kv_cache'], 1] / r['median_ms']:.2f} |")
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
    for modalities in (2, 3):
        for dim in DIMS:
            for untie in ("", "ffn,attn,norm"):
                train.append(bench_train_step(dim, untie, modalities, args.warmup, args.repeats))
                print(f"train step {modalities} modalities dim {dim} {train[-1]['model']}: "
                      f"{train[-1]['median_ms']:.1f} ms", flush=True)
    attention = []
    for seq_len in SEQ_LENS:
        attention.append(bench_attention(seq_len, args.warmup, args.repeats))
        print(f"attention T={seq_len}: mask {attention[-1]['transfusion_mask_ms']:.2f} ms, "
              f"causal {attention[-1]['causal_ms']:.2f} ms", flush=True)
    sampling = bench_sampling(1, min(args.repeats, SAMPLING_REPEATS))
    write_results(args.out, header, train, attention, sampling, args.note)
    print(f"wrote {args.out}/train_step.json, attention.json, sampling.json, README.md")


if __name__ == "__main__":
    main()
