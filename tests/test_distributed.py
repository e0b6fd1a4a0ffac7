"""Several processes on CPU (gloo): 2 ranks == 1 process, fsdp == ddp, checkpoints across world sizes.

The 2-rank runs are real: two spawned processes, a gloo process group, `train()` on each rank, as
under `torchrun --nproc_per_node=2`. All of them run once, in the module's `runs` fixture.
"""

import copy
import dataclasses
import faulthandler
import os
import shutil
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import random_batch
from torch.distributed.tensor import DTensor

from motfusion.data.pipeline import make_packer
from motfusion.errors import ConfigError
from motfusion.models.attention import DocumentBuckets, SeqMeta, attend, dense_mask, document_buckets
from motfusion.models.layers import RMSNorm
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import GlobalBatch, TransfusionObjective
from motfusion.recipes import get_recipe
from motfusion.sequence import Image, Text, collate, encode_document
from motfusion.tokenizer import ByteTokenizer
from motfusion.training.checkpoint import (
    EMA_FILE,
    EMA_SHARDED_DIR,
    MODEL_FILE,
    SHARDED_DIR,
    load_model,
    load_train_state,
    step_dir,
)
from motfusion.training.distributed import World, locate
from motfusion.training.logging import read_metrics
from motfusion.training.parallelize import autocast, parallel_mode, parallelize, resolve_precision
from motfusion.training.trainer import build_optimizer, train, train_step

STEPS = [
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=0",
    "train.log_every=1",
    "train.device=cpu",
    "train.tensorboard=false",
    "train.ema=0.9",
]
TOL = 1e-5


def run_cfg(*overrides: str):
    """The debug recipe (global batch 4 x 192) for 4 steps, a checkpoint every 2."""
    return get_recipe("debug").override([*STEPS, *overrides])


ALIGN = ["objective.contrastive_weight=0.5", "model.align_dim=16"]
EDIT = ["data.dataset=shapes-edit", "data.edit_share=1.0"]  # clean source images: no noise, no loss
# Muon on the backbone and on the U-Net's conv filters (train.muon_convs), under FSDP too
MUON = ("train.optimizer=muon", "model.patcher=unet", "train.muon_convs=true")


def curve(run_dir: Path, extra: tuple[str, ...] = ()) -> list[list[float]]:
    keys = ("loss", "loss/text", "loss/image", "grad_norm", *extra)
    return [[r["step"], *(r[k] for k in keys)] for r in read_metrics(run_dir / "metrics.jsonl")]


def assert_same_curve(a: list[list[float]], b: list[list[float]]) -> None:
    assert [r[0] for r in a] == [r[0] for r in b]
    torch.testing.assert_close(
        torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), rtol=1e-6, atol=TOL
    )  # rtol: float32 sums in another order (a grad norm of 28)


def rewind(run_dir: Path, to: Path) -> Path:
    """A copy of a run as if it had died after its step-2 checkpoint."""
    shutil.copytree(run_dir, to)
    shutil.rmtree(step_dir(to, 4))
    return to


def uneven_rows(cfg) -> list[list]:
    """Two rows of encoded documents: captioned images, then text only (no image on that rank)."""
    g, tok = torch.Generator().manual_seed(0), ByteTokenizer()
    red, blue = (Image(torch.rand(3, 16, 16, generator=g) * 2 - 1) for _ in range(2))
    rows = [
        [[Text("a red circle"), red], [blue, Text("two blue squares")]],
        [[Text("no image here")], [Text("nor here: only text")]],
    ]
    return [[encode_document(doc, tok, cfg.model.patch_size) for doc in row] for row in rows]


def step_gradients(cfg, batch, world: World) -> dict[str, torch.Tensor]:
    """The (clipped, rank-averaged) gradients of one training step of the seed-0 model, parallelized
    for `world`, on this rank's `batch`. Gradients, not weights: AdamW's update hides their scale."""
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, ByteTokenizer().vocab_size)
    parallelize(model, cfg.train, world)
    whole, _ = locate(batch, {})
    train_step(
        model,
        TransfusionObjective(cfg.objective),
        build_optimizer(model, cfg.train),
        batch,
        torch.Generator().manual_seed(0),
        1e-3,
        1.0,
        whole=whole,
        world_size=world.world_size,
    )
    return {
        name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        for name, p in model.named_parameters()
    }


# ---- the 2-rank runs -------------------------------------------------------------------------


def _rank_main(rank: int, port: int, root: Path) -> None:
    """One of the 2 ranks: what torchrun would set up, then every 2-rank training of the module.
    Its output, C++ aborts included, goes to root/rank{rank}.log, which a failure shows."""
    log = os.open(root / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    faulthandler.enable()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        train(run_cfg("train.parallel=ddp"), root / "ddp")
        train(run_cfg("train.parallel=fsdp"), root / "fsdp")
        train(run_cfg("train.parallel=fsdp", *ALIGN), root / "fsdp_align")
        train(run_cfg("train.parallel=fsdp", *EDIT), root / "fsdp_edit")
        train(run_cfg("train.parallel=fsdp", *MUON), root / "fsdp_muon")
        train(run_cfg("train.parallel=fsdp"), root / "one_to_fsdp", resume=True)
        train(run_cfg("train.parallel=ddp"), root / "one_to_ddp", resume=True)
        for mode in ("ddp", "fsdp"):
            cfg = run_cfg(f"train.parallel={mode}")
            mine = collate([uneven_rows(cfg)[rank]], cfg.train.seq_len, ByteTokenizer().pad)
            grads = step_gradients(cfg, mine, World(rank=rank, world_size=2, local_rank=rank))
            if rank == 0:
                torch.save(grads, root / f"uneven_{mode}.pt")
        dist.barrier()  # neither rank closes its connections while the other may still be reading
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two_ranks(root: Path, timeout_s: float = 600) -> None:
    ctx = mp.start_processes(
        _rank_main, args=(_free_port(), root), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the 2-rank runs did not finish in {timeout_s} s")
    except mp.ProcessExitedException as e:
        logs = "\n".join(f"--- rank {r} ---\n" + (root / f"rank{r}.log").read_text()[-4000:] for r in (0, 1))
        pytest.fail(f"{e}\n{logs}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """root/one: 1 process; ddp, fsdp: 2 ranks; one_to_*: 1-process checkpoints resumed by 2 ranks;
    *_to_one: 2-rank checkpoints resumed by 1 process. All from step 2 to 4. uneven_*.pt: the
    gradients of one 2-rank step where rank 1 holds no image."""
    root = tmp_path_factory.mktemp("runs")
    train(run_cfg(), root / "one")
    train(run_cfg(*ALIGN), root / "one_align")
    train(run_cfg(*EDIT), root / "one_edit")
    train(run_cfg(*MUON), root / "one_muon")
    rewind(root / "one", root / "one_to_fsdp")
    rewind(root / "one", root / "one_to_ddp")
    spawn_two_ranks(root)
    for mode in ("ddp", "fsdp"):
        train(run_cfg(f"train.parallel={mode}"), rewind(root / mode, root / f"{mode}_to_one"), resume=True)
    train(run_cfg(*MUON), rewind(root / "fsdp_muon", root / "fsdp_muon_to_one"), resume=True)
    return root


def test_two_ranks_give_the_losses_of_one_process(runs):
    """(a) The same global batch on 2 ranks (2 rows each) and on 1 process (4 rows): same per-step losses."""
    one = curve(runs / "one")
    assert len(one) == 4
    assert_same_curve(curve(runs / "ddp"), one)


def test_contrastive_loss_over_two_ranks_is_that_of_one_process(runs):
    """InfoNCE over the pairs gathered from both ranks, and its gradient through the gather."""
    assert_same_curve(
        curve(runs / "one_align", ("loss/contrastive",)), curve(runs / "fsdp_align", ("loss/contrastive",))
    )


def test_editing_over_two_ranks_is_that_of_one_process(runs):
    """Edit documents: the clean sources are counted out of the image loss over the global batch."""
    assert_same_curve(curve(runs / "fsdp_edit"), curve(runs / "one_edit"))


def test_muon_over_two_sharded_ranks_is_that_of_one_process(runs):
    """train.optimizer=muon under FSDP: each rank orthogonalizes the whole matrix and keeps its shard;
    its sharded momentum buffers resume in one process."""
    one = curve(runs / "one_muon")
    assert_same_curve(curve(runs / "fsdp_muon"), one)
    assert_same_curve(curve(runs / "fsdp_muon_to_one"), one)
    assert curve(runs / "one")[-1] != one[-1]


def test_fsdp_gives_the_losses_of_ddp(runs):
    """(b) Sharded weights, gradients and optimizer state change nothing but float rounding."""
    assert_same_curve(curve(runs / "fsdp"), curve(runs / "ddp"))


def test_checkpoints_resume_across_world_sizes(runs):
    """(c) Steps 3-4 resumed from a step-2 checkpoint equal the straight 1-process run, whichever
    world size and train.parallel wrote the checkpoint and whichever resumes it."""
    sharded, full = step_dir(runs / "fsdp", 2), step_dir(runs / "ddp", 2)
    assert (sharded / SHARDED_DIR).is_dir() and not (sharded / MODEL_FILE).exists()
    assert (full / MODEL_FILE).is_file() and not (full / SHARDED_DIR).exists()
    one = curve(runs / "one")
    for name in ("one_to_fsdp", "one_to_ddp", "fsdp_to_one", "ddp_to_one"):
        resumed = curve(runs / name)
        assert [r[0] for r in resumed] == [1, 2, 3, 4], name
        assert_same_curve(resumed, one)


def test_a_rank_without_images_trains_like_one_process(runs):
    """A rank whose rows hold no image leaves the image tower and patcher without gradients: the
    ranks still agree (no hang) and the step equals one process's on both rows."""
    cfg = run_cfg()
    both = collate(uneven_rows(cfg), cfg.train.seq_len, ByteTokenizer().pad)
    assert both.images.shape[0] == 2 and not (both.image >= 0)[1].any()
    reference = step_gradients(cfg, both, World())
    assert reference["image.proj_out.weight"].abs().max() > 0
    for mode in ("ddp", "fsdp"):
        grads = torch.load(runs / f"uneven_{mode}.pt")
        assert grads.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(grads[key], value, rtol=1e-5, atol=1e-7, msg=f"{mode}: {key}")


def test_load_model_reads_sharded_and_full_checkpoints(runs):
    """load_model (sampling) takes a sharded checkpoint like a full one: same weights as 1 process."""
    reference = load_model(runs / "one")[0].state_dict()
    for name in ("fsdp", "ddp", "one_to_fsdp"):
        weights = load_model(runs / name)[0].state_dict()
        assert weights.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=TOL, msg=f"{name}: {key}")


def test_moving_average_over_two_ranks_is_that_of_one_process(runs):
    """train.ema: each rank averages its own shards; saved sharded (fsdp) or whole (ddp), resumed
    across world sizes, the average equals one process's, and differs from the raw weights."""
    assert (step_dir(runs / "fsdp", 4) / EMA_SHARDED_DIR).is_dir()
    assert (step_dir(runs / "ddp", 4) / EMA_FILE).is_file()
    reference = load_model(runs / "one", ema=True)[0].state_dict()
    raw = load_model(runs / "one", ema=False)[0].state_dict()
    assert any(not torch.equal(reference[k], raw[k]) for k in raw)
    for name in ("fsdp", "ddp", "one_to_fsdp", "fsdp_to_one", "ddp_to_one"):
        weights = load_model(runs / name, ema=True)[0].state_dict()
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=TOL, msg=f"{name}: {key}")


def test_two_rank_run_reads_the_documents_of_one_process(runs):
    """(e) The 2-rank runs consumed exactly the documents of the 1-process run, checkpoint by checkpoint."""
    for step in (2, 4):
        one = load_train_state(step_dir(runs / "one", step))["packer"]
        for name in ("ddp", "fsdp"):
            assert load_train_state(step_dir(runs / name, step))["packer"] == one


# ---- in one process --------------------------------------------------------------------------


def _row_docs(batch) -> list[tuple]:
    """Each row's documents as (tokens, image bytes), read back from a packed batch."""
    rows = []
    for b in range(batch.shape[0]):
        docs = []
        for d in range(int(batch.doc[b].max()) + 1):
            at = batch.doc[b] == d
            images = batch.image[b][at].unique()
            docs.append(
                (
                    tuple(batch.tokens[b][at].tolist()),
                    tuple(batch.images[i].numpy().tobytes() for i in images[images >= 0].tolist()),
                )
            )
        rows.append(tuple(docs))
    return rows


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_global_batch_by_rows(tok, world_size):
    """(e) Ranks take contiguous rows of the global batch: together the rows of one process, in
    order, so every document is used once (no duplicates, no gaps), and the packer state is the same."""
    cfg = run_cfg("train.batch_size=4", "train.seq_len=128")
    one = make_packer(cfg, tok)
    ranks = [make_packer(cfg, tok, "train", r, world_size) for r in range(world_size)]
    for _ in range(3):
        rows = [row for packer in ranks for row in _row_docs(packer.next_batch())]
        assert rows == _row_docs(one.next_batch())
        docs = [doc for row in rows for doc in row]
        assert len(set(docs)) == len(docs)
    assert all(p.state_dict() == one.state_dict() for p in ranks)


def test_batch_size_must_split_over_ranks(tok):
    with pytest.raises(ConfigError, match="train.batch_size=4 is the global batch"):
        make_packer(run_cfg(), tok, "train", 0, 3)
    with pytest.raises(ConfigError, match="train.parallel=none with 2 processes"):
        parallel_mode(run_cfg("train.parallel=none").train, 2)
    assert parallel_mode(run_cfg().train, 2) == "ddp"
    assert parallel_mode(run_cfg("train.parallel=fsdp").train, 1) == "none"


def test_rank_shares_add_up_to_the_global_loss(tok):
    """Each rank's loss is its share of the global means, with the noise of the global batch: the
    shares of 2 ranks add up to the 1-process loss, part by part."""
    cfg = run_cfg()
    torch.manual_seed(0)
    model, objective = TransfusionModel(cfg.model, tok.vocab_size), TransfusionObjective(cfg.objective)
    halves = [make_packer(cfg, tok, "train", r, 2).next_batch() for r in range(2)]
    whole = make_packer(cfg, tok).next_batch()
    total = GlobalBatch.of(whole)
    places = [dataclasses.replace(total, image_offset=offset) for offset in (0, halves[0].images.shape[0])]
    with torch.no_grad():
        loss, parts = objective(model, whole, torch.Generator().manual_seed(7))
        shares = [
            objective(model, half, torch.Generator().manual_seed(7), place)
            for half, place in zip(halves, places)
        ]
        t, noise = objective.draw(whole, total, torch.Generator().manual_seed(7))
        drawn = [
            objective.draw(half, place, torch.Generator().manual_seed(7))
            for half, place in zip(halves, places)
        ]
    assert torch.equal(torch.cat([d[0] for d in drawn]), t) and torch.equal(
        torch.cat([d[1] for d in drawn]), noise
    )
    torch.testing.assert_close(shares[0][0] + shares[1][0], loss, rtol=1e-6, atol=0)
    for key in parts:
        torch.testing.assert_close(shares[0][1][key] + shares[1][1][key], parts[key], rtol=1e-6, atol=0)


def _saving(counter: list[int]):
    def pack(t: torch.Tensor) -> torch.Tensor:
        counter[0] += t.numel()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def test_activation_checkpointing_keeps_gradients_and_saves_less(tok):
    """(d) Recomputing each block in backward gives the same gradients, and keeps fewer activations."""
    cfg = run_cfg()
    batch = make_packer(cfg, tok).next_batch()
    torch.manual_seed(0)
    plain = TransfusionModel(cfg.model, tok.vocab_size)
    checkpointed = copy.deepcopy(plain)
    stepper = parallelize(checkpointed, run_cfg("train.activation_checkpointing=true").train, World())
    objective, saved = TransfusionObjective(cfg.objective), []
    for model in (plain, stepper):
        counter = [0]
        with _saving(counter):
            loss, _ = objective(model, batch, torch.Generator().manual_seed(0))
        loss.backward()
        saved.append(counter[0])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6, msg=name)
    assert saved[1] < 0.5 * saved[0]


def test_bf16_autocast_trains_on_cpu(tok):
    """train.precision=bf16 on CPU: matmuls run in bfloat16, weights and gradients stay fp32, and the
    first step's loss is within 1% of fp32's."""
    cfg = run_cfg()
    batch = make_packer(cfg, tok).next_batch()
    torch.manual_seed(0)
    fp32 = TransfusionModel(cfg.model, tok.vocab_size)
    bf16 = copy.deepcopy(fp32)
    seen = []
    bf16.text.head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    stats = [
        train_step(
            m,
            TransfusionObjective(cfg.objective),
            build_optimizer(m, cfg.train),
            batch,
            torch.Generator().manual_seed(0),
            1e-3,
            1.0,
            precision=precision,
        )
        for m, precision in ((fp32, "fp32"), (bf16, "bf16"))
    ]
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in bf16.parameters())
    assert stats[1]["loss"] == pytest.approx(stats[0]["loss"], rel=1e-2)


@pytest.mark.parametrize("backend", ["sdpa", "documents"])
def test_attention_stays_fp32_on_cpu_under_bf16_autocast(tok, backend):
    """CPU bf16 autocast: attention computes in fp32 on the bf16 q, k, v (torch's bf16 CPU flash
    attention is ten times slower backward) and returns bf16; the same numbers as fp32 attention."""
    batch = random_batch(tok, seed=0)
    B, T = batch.shape
    meta = SeqMeta(batch.doc, batch.image, torch.arange(T).expand(B, T))
    mask = (
        document_buckets(meta, True, min_saving=1.0)
        if backend == "documents"
        else dense_mask(meta, meta, True)
    )
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, 2, T, 8, generator=gen).bfloat16().requires_grad_() for _ in range(3))

    def run(q, k, v):
        if isinstance(mask, DocumentBuckets):  # positions flat: (N, H, hd)
            flat = [t.transpose(1, 2).reshape(B * T, 2, 8) for t in (q, k, v)]
            return mask.attend(*flat).view(B, T, 2, 8).transpose(1, 2)
        return attend(q, k, v, mask)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(q, k, v)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, run(q.float(), k.float(), v.float()).bfloat16(), rtol=0, atol=0)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_precision_auto_is_bf16_only_where_bf16_is_fast(monkeypatch):
    """train.precision=auto: bf16 on a CPU with AMX, fp32 on one without (there bf16 takes 0.97-11
    times fp32's step time); fp32 and bf16 stay as they are, and other values are a config error."""
    cpu = torch.device("cpu")
    for amx, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert resolve_precision("auto", cpu) == expected
        assert autocast("auto", cpu).fast_dtype == torch.bfloat16
        with autocast("auto", cpu):
            assert torch.is_autocast_enabled("cpu") == (expected == "bf16")
        assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    cfg = get_recipe("debug")
    cfg.train.precision = "fp16"
    with pytest.raises(ConfigError, match="choose fp32, bf16 or auto"):
        cfg.validate()


def test_rms_norm_computes_in_fp32_and_returns_the_input_dtype():
    """Under bf16 autocast the norms read a matmul's bf16 output: RMSNorm upcasts (no mixed-dtype
    warning from torch's unfused fallback) and hands back bf16, equal to the fp32 norm rounded."""
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, norm(x.float()).bfloat16(), rtol=0, atol=0)
