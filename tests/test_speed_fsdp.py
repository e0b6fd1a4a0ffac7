"""Under FSDP with 2 ranks (gloo on CPU), the MoT backbone's tower-order stream and document buckets
give the gradients of the row-order path with the dense mask (mot.py's blocks called on an unsorted
Route, each step gathering in and out: the path tests/test_mot.py checks against a per-token reference)."""

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import random_batch
from torch.distributed.tensor import DTensor

from motfusion.models.mot import each_tower, weight_key
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.recipes import get_recipe
from motfusion.tokenizer import ByteTokenizer
from motfusion.training.distributed import World, locate
from motfusion.training.parallelize import parallelize
from motfusion.training.trainer import build_optimizer, train_step


def row_order(backbone):
    """The backbone's forward with the residual stream left in row order (each block gathers per step)."""

    def forward(x, route, rope, mask, cache=None):
        B, T, D = x.shape
        for block in backbone.blocks:  # through __call__: FSDP gathers each block's weights
            x, _ = block(x, route, rope, mask)
        norm = lambda t, xs: backbone.final_norm[weight_key(backbone.cfg, "norm", t)](xs)
        return each_tower(x.reshape(B * T, D), route, norm).view(B, T, D), []

    return forward


def gradients(rank: int, fast: bool) -> dict[str, torch.Tensor]:
    overrides = ["train.parallel=fsdp", f"model.attention_backend={'auto' if fast else 'sdpa'}"]
    cfg = get_recipe("debug").override(overrides)
    torch.manual_seed(0)
    model = TransfusionModel(cfg.model, ByteTokenizer().vocab_size)
    if not fast:
        model.backbone.forward = row_order(model.backbone)
    parallelize(model, cfg.train, World(rank=rank, world_size=2, local_rank=rank))
    batch = random_batch(ByteTokenizer(), seed=rank, rows=2, seq_len=160)  # each rank its own rows
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
        world_size=2,
    )
    return {
        n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        for n, p in model.named_parameters()
    }


def _rank_main(rank: int, port: int, root: Path) -> None:
    log = os.open(root / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        grads = {fast: gradients(rank, fast) for fast in (True, False)}
        torch.save(grads, root / f"grads{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tower_order_equals_row_order_under_fsdp(tmp_path):
    try:
        mp.start_processes(_rank_main, args=(_free_port(), tmp_path), nprocs=2, start_method="spawn")
    except mp.ProcessExitedException as e:
        logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in (0, 1))
        pytest.fail(f"{e}\n{logs}")
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        fast, reference = grads[True], grads[False]
        assert fast.keys() == reference.keys()
        assert sum(g is not None for g in fast.values()) > 10
        for name, g in fast.items():
            if g is None:
                assert reference[name] is None, name
                continue
            torch.testing.assert_close(g, reference[name], atol=1e-5, rtol=1e-4, msg=name)
