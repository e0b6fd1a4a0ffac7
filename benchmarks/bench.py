"""Speed on the host, each measure against its target (issue 12, "Speed").

    python benchmarks/bench.py [--repeats N] [--warmup N] [--threads 1,2] [--no-compile] [--note TEXT] [--out DIR]

1. Train step, MoT vs dense at equal FLOPs per token (target: MoT / dense <= 1.05). One optimizer
   update (forward, Transfusion loss, backward, gradient clipping, AdamW) of the debug recipe widened
   to dims 64, 128 and 256, on one packed batch, with every component untied per modality (MoT) and
   with none (dense); at each --threads, and at the debug recipe's 4 rows of 192 tokens and at 16
   (3,072 tokens, a training-size step: a tower's matmuls then see ~1,000 tokens, not ~250). Two
   modalities: text+image documents of the shapes data. Three: the same plus text+speech documents
   (random units, 2 per caption character, at most 96) and a speech tower. Dense and MoT steps
   alternate in one process, so a busy host slows both alike. Each row also times forward +
   backward alone: the model's share, without the optimizer and clipping, whose work grows with the
   parameter count (MoT has ~M x the backbone's). Memory: weights + gradients + AdamW states +
   activations saved for backward (exact byte counts on CPU).
2. Attention (target: full causal / documents >= 3 at 2,048 positions). sdpa forward + backward over
   a row of 256-position documents (text, one 64-patch image, text): the dense Transfusion mask, the
   `documents` backend (models/attention.py: attention per bucket of documents) and plain causal
   attention over the whole row (`is_causal=True`).
3. Utilisation (target: >= 50% at dim 256). The host's fp32 GEMM peak, measured here (the best of
   square matmuls), against the achieved GFLOP/s of a full train step (training/flops.py's count of
   model FLOPs / step time) at the demo recipe's model and at dim 256 (the debug recipe widened);
   torch.profiler splits each step's time by kind of op: where the rest goes.
4. Compile: train.compile=true against eager, steady-state step time over a rotation of packed
   batches (as training sees them), and the seconds the first pass over them took (compilation).
5. Sampling with the demo recipe's model (random weights: speed does not depend on them): text to
   image (Euler, 20 steps, guidance 3; conditional and unconditional rows in one batch) with the
   prompt's keys and values cached vs recomputed; image to text, 32 greedy tokens per image, with the
   KV cache vs recomputing; each for a batch of 8 prompts vs the 8 one by one.

Every figure is the median of `--repeats` timed runs after `--warmup` untimed ones (sampling and
compile: fewer, see SAMPLING_REPEATS). Results go to OUT/*.json and OUT/README.md (tables, targets,
the command and the machine).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import profile

from motfusion.config import Config
from motfusion.data.pipeline import make_packer
from motfusion.data.shapes import ShapesDataset
from motfusion.models.attention import SeqMeta, build_mask, dense_mask
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.recipes import get_recipe
from motfusion.sampling.generate import Generator, SampleConfig
from motfusion.sequence import Batch, Image, Text, Units, pack_documents
from motfusion.tokenizer import build_tokenizer
from motfusion.training.distributed import World
from motfusion.training.flops import FlopCounter
from motfusion.training.parallelize import parallelize
from motfusion.training.trainer import build_optimizer, train_step

DIMS = (64, 128, 256)
BATCH_SIZES = (4, 16)  # rows of 192 tokens per train step
SEQ_LENS = (256, 512, 1024, 2048)
HEADS, HEAD_DIM = 4, 32
DOC_LEN, IMAGE_PATCHES = 256, 64  # attention benchmark: each document is text, one image, text
THREE_TOWERS = ("model.towers=text:text,image:image,speech:speech", "model.vocab_sizes=speech:500")
SAMPLING_BATCH, SAMPLING_REPEATS = 8, 5
COMPILE_BATCHES = 4  # distinct packed batches the compile benchmark rotates through
GEMM_SIZES = (512, 1024, 1536)
TARGETS = {"mot_over_dense": 1.05, "causal_over_documents": 3.0, "utilisation": 0.5}
MOT_GAP = (
    "Where MoT's extra time goes at these sizes, and how MoT / dense falls with the tokens per step: "
    "[mot_gap.md](mot_gap.md) (`python benchmarks/mot_gap.py`)."
)


def median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    return interleaved_ms({"": fn}, warmup, repeats)[""]


def interleaved_ms(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of each fn, run in turn (one of each per round) so that load on the host hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


# ---- 1. train step ----------------------------------------------------------------------------


@dataclass
class Setup:
    """A model ready to train on fixed batches: `step` is a full update (fp32 unless given a
    train.precision), `forward_backward` the model's part."""

    cfg: Config
    model: TransfusionModel
    optimizer: torch.optim.Optimizer
    batches: list[Batch]
    step: Callable[..., object]
    forward_backward: Callable[[], object]


def setup(recipe: str, overrides: list[str], modalities: int = 2, batches: int = 1) -> Setup:
    cfg = get_recipe(recipe).override(["data.tokenizer=bytes", *overrides])  # bpe:N is trained with a run
    tok = build_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(0)
    model = parallelize(TransfusionModel(cfg.model, tok.vocab_size), cfg.train, World())
    objective = TransfusionObjective(cfg.objective)
    optimizer = build_optimizer(model, cfg.train)
    if modalities == 3:
        data = [three_modality_batch(cfg, tok)]
    else:
        packer = make_packer(cfg, tok)
        data = [packer.next_batch() for _ in range(batches)]
    generator = torch.Generator().manual_seed(0)
    turn = [0]

    def batch() -> Batch:
        turn[0] += 1
        return data[turn[0] % len(data)]

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        objective(model, batch(), generator, None)[0].backward()

    step = lambda precision="fp32": train_step(
        model,
        objective,
        optimizer,
        batch(),
        generator,
        cfg.train.lr,
        cfg.train.grad_clip,
        precision=precision,
    )
    return Setup(cfg, model, optimizer, data, step, forward_backward)


def three_modality_batch(cfg, tok) -> Batch:
    """(B, T) rows of shapes text+image documents alternating with text+speech ones (speech first or second)."""
    shapes = ShapesDataset(image_size=cfg.data.image_size)
    g = torch.Generator().manual_seed(0)
    docs, i = [], 0
    while True:
        sample = shapes.sample(i)
        units = Units("speech", torch.randint(0, 500, (min(2 * len(sample.caption), 96),), generator=g))
        docs += [
            [Text(sample.caption), Image(sample.image)],
            [units, Text(sample.caption)] if i % 2 else [Text(sample.caption), units],
        ]
        batch = pack_documents(docs, tok, cfg.model.patch_size, cfg.train.seq_len)
        if batch.shape[0] > cfg.train.batch_size:
            return pack_documents(docs[:-2], tok, cfg.model.patch_size, cfg.train.seq_len)
        i += 1


def memory_mb(model: TransfusionModel, step: Callable[[], object], optimizer) -> dict:
    """Peak allocated on CUDA; on CPU: weights + gradients + AdamW states + activations saved for backward."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    states = sum(
        t.numel() * t.element_size()
        for st in optimizer.state.values()
        for t in st.values()
        if torch.is_tensor(t)
    )
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    out = {
        "weights_mb": params / 2**20,
        "grads_mb": params / 2**20,
        "adam_mb": states / 2**20,
        "saved_activations_mb": saved[0] / 2**20,
    }
    out["total_mb"] = sum(out.values())
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def bench_train_step(
    dim: int, modalities: int, threads: int, batch_size: int, warmup: int, repeats: int, memory: bool
) -> list[dict]:
    """Dense and MoT rows at width `dim`: full step and forward + backward, alternating in one process."""
    torch.set_num_threads(threads)
    models = {"dense": "", "MoT": "ffn,attn,norm"}
    three = THREE_TOWERS if modalities == 3 else ()
    size = [f"model.dim={dim}", f"train.batch_size={batch_size}"]
    runs = {
        name: setup("debug", [*size, f"model.untie={untie}", *three], modalities)
        for name, untie in models.items()
    }
    step = interleaved_ms({name: s.step for name, s in runs.items()}, warmup, repeats)
    fwd_bwd = interleaved_ms({name: s.forward_backward for name, s in runs.items()}, warmup, repeats)
    rows = []
    for name, s in runs.items():
        flops = FlopCounter(s.model).count(s.batches[0])
        row = {
            "dim": dim,
            "modalities": modalities,
            "model": name,
            "untie": models[name],
            "threads": threads,
            "params": s.model.num_params(),
            "non_embedding_params": s.model.num_params(non_embedding=True),
            "flops_per_token": {k: round(v) for k, v in flops.per_token().items()},
            "batch": f"{s.cfg.train.batch_size}x{s.cfg.train.seq_len}",
            "median_ms": step[name],
            "forward_backward_ms": fwd_bwd[name],
            "mot_over_dense": step[name] / step["dense"],
            "forward_backward_mot_over_dense": fwd_bwd[name] / fwd_bwd["dense"],
        }
        if memory:
            row["memory"] = memory_mb(s.model, s.step, s.optimizer)
        rows.append(row)
    return rows


# ---- 2. attention -----------------------------------------------------------------------------


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
    """Median ms of forward + backward: dense mask, documents backend, is_causal; and of building each mask."""
    q, k, v = (torch.randn(1, HEADS, seq_len, HEAD_DIM, requires_grad=True) for _ in range(3))
    flat = [t.detach().transpose(1, 2).reshape(seq_len, HEADS, HEAD_DIM).requires_grad_() for t in (q, k, v)]
    meta = transfusion_meta(seq_len)
    mask = dense_mask(meta, meta, bidirectional=True)  # (1, 1, T, T)
    buckets = build_mask("documents", meta, meta, True)  # falls back to the dense mask for one document
    sdpa = lambda **kw: lambda: F.scaled_dot_product_attention(q, k, v, **kw).sum().backward()
    documents = (
        (lambda: buckets.attend(*flat).sum().backward())
        if not torch.is_tensor(buckets)
        else sdpa(attn_mask=mask)
    )
    ms = interleaved_ms(
        {"mask": sdpa(attn_mask=mask), "documents": documents, "causal": sdpa(is_causal=True)},
        warmup,
        repeats,
    )
    build = interleaved_ms(
        {
            "mask": lambda: dense_mask(meta, meta, True),
            "documents": lambda: build_mask("documents", meta, meta, True),
        },
        warmup,
        repeats,
    )
    return {
        "seq_len": seq_len,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "transfusion_mask_ms": ms["mask"],
        "documents_ms": ms["documents"],
        "causal_ms": ms["causal"],
        "mask_build_ms": build["mask"],
        "documents_build_ms": build["documents"],
        "bucketed": not torch.is_tensor(buckets),
        "causal_over_documents": ms["causal"] / ms["documents"],
    }


# ---- 3. utilisation ---------------------------------------------------------------------------

OP_KINDS = (  # torch.profiler op name -> kind; first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("convolution", ("convolution",)),
    ("optimizer", ("adam", "Optimizer", "_foreach", "lerp", "sqrt", "addcdiv", "addcmul")),
    (
        "gather / scatter / copy",
        ("index", "gather", "scatter", "cat", "copy_", "clone", "contiguous", "stack", "_to_copy"),
    ),
)


def gemm_peak_gflops(repeats: int) -> dict:
    """The best fp32 GFLOP/s of square matmuls on this host at the current thread count."""
    best = {}
    for n in GEMM_SIZES:
        a, b = torch.randn(n, n), torch.randn(n, n)
        ms = median_ms(lambda a=a, b=b: a @ b, 1, max(3, repeats // 4))
        best[n] = 2 * n**3 / (ms / 1e3) / 1e9
    return {"gflops": max(best.values()), "by_size": best}


def op_split(step: Callable[[], object], steps: int = 3) -> dict[str, float]:
    """Share of the self CPU time of `steps` steps per kind of op (OP_KINDS, then elementwise and other)."""
    with profile() as prof:
        for _ in range(steps):
            step()
    split: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key
        kind = next((k for k, keys in OP_KINDS if any(s in name for s in keys)), None)
        if kind is None:
            kind = "elementwise and reductions" if name.startswith("aten::") else "python, autograd and other"
        split[kind] = split.get(kind, 0.0) + event.self_cpu_time_total
    total = sum(split.values())
    return {k: v / total for k, v in sorted(split.items(), key=lambda kv: -kv[1])}


def bench_utilisation(
    name: str, recipe: str, overrides: list[str], peak: float, warmup: int, repeats: int
) -> dict:
    s = setup(recipe, overrides)
    flops = FlopCounter(s.model).count(s.batches[0]).total
    ms = median_ms(s.step, warmup, repeats)
    gflops = flops / (ms / 1e3) / 1e9
    return {
        "name": name,
        "recipe": recipe,
        "overrides": overrides,
        "params": s.model.num_params(),
        "batch": f"{s.cfg.train.batch_size}x{s.cfg.train.seq_len}",
        "median_ms": ms,
        "flops_per_step": flops,
        "gflops": gflops,
        "peak_gflops": peak,
        "utilisation": gflops / peak,
        "time_split": op_split(s.step),
    }


# ---- 4. compile -------------------------------------------------------------------------------


def bench_compile(dim: int, repeats: int) -> dict:
    """Eager vs train.compile=true over COMPILE_BATCHES packed batches in turn; the first pass is the warmup."""
    runs = {
        mode: setup(
            "debug", [f"model.dim={dim}", f"train.compile={mode == 'compiled'}"], batches=COMPILE_BATCHES
        )
        for mode in ("eager", "compiled")
    }
    warmup_s, losses = {}, {}
    for mode, s in runs.items():
        start = time.perf_counter()
        losses[mode] = [s.step()["loss"] for _ in range(COMPILE_BATCHES)]
        warmup_s[mode] = time.perf_counter() - start
    ms = interleaved_ms({mode: s.step for mode, s in runs.items()}, 0, repeats)
    return {
        "dim": dim,
        "batches": COMPILE_BATCHES,
        "eager_ms": ms["eager"],
        "compiled_ms": ms["compiled"],
        "speedup": ms["eager"] / ms["compiled"],
        "warmup_s": warmup_s,
        "losses": losses,
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"])),
        "break_even_steps": warmup_s["compiled"] / max(1e-9, (ms["eager"] - ms["compiled"]) / 1e3),
    }


# ---- 5. sampling ------------------------------------------------------------------------------


def bench_sampling(warmup: int, repeats: int) -> list[dict]:
    """Text to image and image to text with the demo recipe's model: cache on/off, batched vs one by one."""
    cfg = get_recipe("demo").override(
        ["data.tokenizer=bytes"]
    )  # bpe:512 is trained with a run; speed is alike
    tok = build_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, tok.vocab_size).eval()
    shapes = ShapesDataset(image_size=cfg.data.image_size, split="val")
    samples = [shapes.sample(i) for i in range(SAMPLING_BATCH)]
    prompts = [s.caption for s in samples]
    images = torch.stack([s.image for s in samples])
    rows = []
    for cache in (True, False):
        gen = Generator(
            model,
            tok,
            cfg.objective,
            cfg.data.image_size,
            # one image per prompt (not the recipe's best of 4): the sampler's own speed
            SampleConfig(steps=20, guidance=3.0, best_of=1, max_tokens=32, use_cache=cache),
        )
        tasks = {
            # 32 greedy tokens per image (no stop token, so every setting decodes the same count)
            "image_to_text": (lambda idx, gen=gen: sum(map(len, gen.caption_ids(images[idx]))), "tokens"),
            "text_to_image": (lambda idx, gen=gen: len(gen.images([prompts[i] for i in idx])), "images"),
        }
        for task in ("text_to_image", "image_to_text"):
            run, unit = tasks[task]
            for batched in (True, False):
                groups = [list(range(SAMPLING_BATCH))] if batched else [[i] for i in range(SAMPLING_BATCH)]
                made = [0]

                def go(run=run, groups=groups, made=made) -> None:
                    made[0] = sum(run(idx) for idx in groups)

                ms = median_ms(go, warmup, repeats)
                rows.append(
                    {
                        "task": task,
                        "kv_cache": cache,
                        "batch": SAMPLING_BATCH if batched else 1,
                        "items": SAMPLING_BATCH,
                        unit: made[0],
                        "median_ms": ms,
                        f"{unit}_per_s": made[0] / (ms / 1e3),
                    }
                )
                print(f"sampling {task} cache={cache} batch={rows[-1]['batch']}: {ms:.0f} ms", flush=True)
    return rows


# ---- results ----------------------------------------------------------------------------------


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
        platform.processor(),
    )
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
    }


def write_results(out: Path, header: dict, tables: dict[str, object], note: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        (out / f"{name}.json").write_text(
            json.dumps({**header, "note": note, "results": rows}, indent=2) + "\n"
        )
    (out / "README.md").write_text(markdown(header, tables, note))


def targets_table(tables: dict) -> list[str]:
    train, attention, util = tables["train_step"], tables["attention"], tables["utilisation"]
    longest = max(attention, key=lambda r: r["seq_len"])
    widest = util["rows"][-1]
    ok = lambda met: "yes" if met else "**no**"
    lines = ["| measure | target | result | met |", "|---|---|---|---|"]
    for batch in dict.fromkeys(r["batch"] for r in train):
        mot = [r for r in train if r["model"] == "MoT" and r["batch"] == batch]
        worst = max(r["mot_over_dense"] for r in mot)
        worst_fb = max(r["forward_backward_mot_over_dense"] for r in mot)
        lines += [
            f"| MoT / dense train step at {batch} tokens, worst of {len(mot)} (dims, modalities, threads) | "
            f"<= {TARGETS['mot_over_dense']} | {worst:.2f} (best {min(r['mot_over_dense'] for r in mot):.2f}) | "
            f"{ok(worst <= TARGETS['mot_over_dense'])} |",
            f"| the same, forward + backward only (no optimizer) | (the model's share) | {worst_fb:.2f} | |",
        ]
    lines += [
        f"| attention at {longest['seq_len']} positions: full causal / documents | >= "
        f"{TARGETS['causal_over_documents']} | {longest['causal_over_documents']:.2f} | "
        f"{ok(longest['causal_over_documents'] >= TARGETS['causal_over_documents'])} |",
        f"| utilisation of a train step, {widest['name']} | >= {TARGETS['utilisation']:.0%} | "
        f"{widest['utilisation']:.0%} of {widest['peak_gflops']:.0f} GFLOP/s | "
        f"{ok(widest['utilisation'] >= TARGETS['utilisation'])} |",
    ]
    for r in tables["compile"]:
        lines.append(
            f"| train.compile=true vs eager, dim {r['dim']} (steady state) | faster | "
            f"{r['speedup']:.2f}x, after {r['warmup_s']['compiled']:.0f} s of compilation | "
            f"{ok(r['speedup'] > 1)} |"
        )
    rates = {
        r["batch"]: r["images_per_s"]
        for r in tables["sampling"]
        if r["task"] == "text_to_image" and r["kv_cache"]
    }
    lines.append(
        f"| text to image (CFG in one batch), images/s at batch 1 / {SAMPLING_BATCH} | reported | "
        f"{rates.get(1, float('nan')):.1f} / {rates.get(SAMPLING_BATCH, float('nan')):.1f} | |"
    )
    return lines


def train_lines(train: list[dict]) -> list[str]:
    lines = [
        "| modalities | dim | model | threads | params | FLOPs/token (text, image, speech) | batch | step ms "
        "| MoT / dense | fwd+bwd ms | MoT / dense (fwd+bwd) | memory MB (saved activations) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in train:
        f, mem = r["flops_per_token"], r.get("memory")
        flops = " / ".join(f"{f[m]:,}" for m in ("text", "image", "speech") if m in f)
        memory = f"{mem['total_mb']:.1f} ({mem['saved_activations_mb']:.1f})" if mem else ""
        lines.append(
            f"| {r['modalities']} | {r['dim']} | {r['model']} | {r['threads']} | {r['params'] / 1e6:.2f}M | "
            f"{flops} | {r['batch']} | {r['median_ms']:.1f} | {r['mot_over_dense']:.2f} | "
            f"{r['forward_backward_ms']:.1f} | {r['forward_backward_mot_over_dense']:.2f} | {memory} |"
        )
    return lines


def attention_lines(attention: list[dict]) -> list[str]:
    lines = [
        f"B=1, {HEADS} heads of {HEAD_DIM}; documents of {DOC_LEN} positions with one image of "
        f"{IMAGE_PATCHES} patches each. `documents` keeps the dense mask where buckets would not save half.",
        "",
        "| seq len | Transfusion mask ms | documents ms | causal ms | mask / causal | causal / documents "
        "| mask build ms | buckets build ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in attention:
        lines.append(
            f"| {r['seq_len']} | {r['transfusion_mask_ms']:.2f} | {r['documents_ms']:.2f} | "
            f"{r['causal_ms']:.2f} | {r['transfusion_mask_ms'] / r['causal_ms']:.2f} | "
            f"{r['causal_over_documents']:.2f} | {r['mask_build_ms']:.2f} | {r['documents_build_ms']:.2f} |"
        )
    return lines


def utilisation_lines(util: dict) -> list[str]:
    peak = util["peak"]
    sizes = ", ".join(f"{n}: {g:.0f}" for n, g in peak["by_size"].items())
    lines = [
        f"fp32 GEMM peak on this host: {peak['gflops']:.1f} GFLOP/s at {util['threads']} thread(s) "
        f"(square matmuls, GFLOP/s by size: {sizes}). Model FLOPs per step from training/flops.py.",
        "",
        "| model | params | batch | step ms | GFLOP / step | GFLOP/s | utilisation |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in util["rows"]:
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['median_ms']:.1f} | "
            f"{r['flops_per_step'] / 1e9:.2f} | {r['gflops']:.1f} | {r['utilisation']:.0%} |"
        )
    kinds = list(dict.fromkeys(k for r in util["rows"] for k in r["time_split"]))
    lines += [
        "",
        "Where a step's time goes (torch.profiler, self CPU time by kind of op):",
        "",
        "| kind of op | " + " | ".join(r["name"] for r in util["rows"]) + " |",
        "|---|" + "---|" * len(util["rows"]),
    ]
    for k in kinds:
        lines.append(
            f"| {k} | " + " | ".join(f"{r['time_split'].get(k, 0):.0%}" for r in util["rows"]) + " |"
        )
    return lines


def compile_lines(rows: list[dict]) -> list[str]:
    lines = [
        f"The debug recipe at each dim; {COMPILE_BATCHES} packed batches in turn, as training sees them. The first "
        "pass includes compilation, which inductor's on-disk cache (from any earlier run on this host) shortens a "
        "lot: a first-ever compile takes tens of seconds more.",
        "",
        "| dim | eager ms | compiled ms | speed-up | first pass s (eager / compiled) | break-even steps "
        "| max loss difference, first pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dim']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['speedup']:.2f} | "
            f"{r['warmup_s']['eager']:.1f} / {r['warmup_s']['compiled']:.1f} | {r['break_even_steps']:.0f} "
            f"| {r['max_loss_difference']:.1e} |"
        )
    return lines


def sampling_lines(sampling: list[dict]) -> list[str]:
    lines = [
        f"{SAMPLING_BATCH} items per run: text to image is Euler with 20 steps and guidance 3 (conditional "
        "and unconditional rows in one batch); image to text decodes 32 greedy tokens per image.",
        "",
        "| task | KV cache | batch | ms for all items | items/s or tokens/s | cache speed-up | batching speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    ms = {(r["task"], r["kv_cache"], r["batch"]): r["median_ms"] for r in sampling}
    for r in sampling:
        unit = "images" if "images_per_s" in r else "tokens"
        lines.append(
            f"| {r['task']} | {'on' if r['kv_cache'] else 'off'} | {r['batch']} | {r['median_ms']:.0f} | "
            f"{r[unit + '_per_s']:.1f} {unit}/s | {ms[r['task'], False, r['batch']] / r['median_ms']:.2f} | "
            f"{ms[r['task'], r['kv_cache'], 1] / r['median_ms']:.2f} |"
        )
    return lines


def markdown(header: dict, tables: dict, note: str) -> str:
    m = header["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{header['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, threads {header['threads']}, "
        f"load average {m['load_avg_1_5_15']} at the start.",
        "",
        f"Medians of {header['repeats']} runs after {header['warmup']} warmup runs.",
        "",
    ]
    if note:
        lines += [f"**Note:** {note}", ""]
    sections = [
        ("Targets", [*targets_table(tables), "", MOT_GAP]),
        ("1. Train step: MoT vs dense (equal FLOPs per token)", train_lines(tables["train_step"])),
        (
            "2. Attention (sdpa, forward + backward): documents vs the Transfusion mask vs causal",
            attention_lines(tables["attention"]),
        ),
        ("3. Utilisation of a train step", utilisation_lines(tables["utilisation"])),
        ("4. train.compile on CPU", compile_lines(tables["compile"])),
        ("5. Sampling: KV cache and batching (demo recipe's model)", sampling_lines(tables["sampling"])),
    ]
    for title, body in sections:
        lines += [f"## {title}", "", *body, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", default="1,2", help="torch intra-op thread counts for the train-step table")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time train.compile=true against eager (a minute or two of compilation)",
    )
    p.add_argument(
        "--note", default="", help="a remark written into the results, e.g. that the host was busy"
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    header = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine(),
        "threads": threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    tables: dict[str, object] = {"train_step": []}
    for batch_size, n, modalities, dim in itertools.product(BATCH_SIZES, threads, (2, 3), DIMS):
        rows = bench_train_step(
            dim, modalities, n, batch_size, args.warmup, args.repeats, memory=n == threads[0]
        )
        tables["train_step"] += rows
        print(
            f"train step {rows[0]['batch']} {modalities} modalities dim {dim} threads {n}: dense "
            f"{rows[0]['median_ms']:.1f} ms, MoT {rows[1]['median_ms']:.1f} ms ({rows[1]['mot_over_dense']:.2f})",
            flush=True,
        )
    torch.set_num_threads(threads[0])
    tables["attention"] = []
    for seq_len in SEQ_LENS:
        tables["attention"].append(r := bench_attention(seq_len, args.warmup, args.repeats))
        print(
            f"attention T={seq_len}: mask {r['transfusion_mask_ms']:.2f} ms, documents {r['documents_ms']:.2f} ms, "
            f"causal {r['causal_ms']:.2f} ms",
            flush=True,
        )
    peak = gemm_peak_gflops(args.repeats)
    rows = [
        bench_utilisation("demo recipe", "demo", [], peak["gflops"], args.warmup, args.repeats),
        bench_utilisation(
            f"dim {max(DIMS)}", "debug", [f"model.dim={max(DIMS)}"], peak["gflops"], args.warmup, args.repeats
        ),
    ]
    tables["utilisation"] = {"threads": threads[0], "peak": peak, "rows": rows}
    print("utilisation: " + ", ".join(f"{r['name']} {r['utilisation']:.0%}" for r in rows), flush=True)
    compile_dims = sorted({min(DIMS), max(DIMS)}) if args.compile else []
    tables["compile"] = [bench_compile(dim, min(args.repeats, 2 * SAMPLING_REPEATS)) for dim in compile_dims]
    tables["sampling"] = bench_sampling(1, min(args.repeats, SAMPLING_REPEATS))
    write_results(args.out, header, tables, args.note)
    print(f"wrote {args.out}/{{{','.join(tables)}}}.json and README.md")


if __name__ == "__main__":
    main()
