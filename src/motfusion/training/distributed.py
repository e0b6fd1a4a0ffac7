"""Process groups from the torchrun environment, and the few collectives the training loop needs.

`torchrun --nproc_per_node=K -m motfusion train ...` starts K processes and gives each RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed` reads them. Without them
(plain `motfusion train`) the world is one process and no process group is created: every helper
here is then the identity, so the trainer has one code path for 1 and K processes.

Backends: on CUDA, "cpu:gloo,cuda:nccl": NCCL moves GPU tensors (gradients, weights), gloo the host
integers the loop exchanges each step (batch counts, the stop flag), which so never wait for the
GPU. On CPU, gloo for everything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from motfusion.errors import ConfigError
from motfusion.objectives import GlobalBatch
from motfusion.sequence import Batch


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the rank within its node: which GPU it drives
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # init_distributed created the process group, and cleanup destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={value!r} is not an integer (set by torchrun)"
        ) from None


def _rank_device(device: torch.device, local_rank: int, world_size: int) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK. CPU processes share the CPU."""
    if device.type != "cuda":
        return device
    if device.index is not None and world_size > 1:
        raise ConfigError(
            f"train.device={device} names one GPU, but each of the {world_size} processes "
            "drives its own (cuda:LOCAL_RANK): use train.device=auto or cuda"
        )
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
            "start at most that many processes per node (torchrun --nproc_per_node)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device) -> World:
    """The World of this process, joining (or creating) the process group when there are several.

    `device` is the single-process choice (train.device resolved); with several processes a CUDA
    device becomes cuda:LOCAL_RANK. A process group that already exists (e.g. created by a test
    harness or an outer script) is used as is and left to its owner."""
    if dist.is_initialized():
        local_rank = _env_int("LOCAL_RANK", 0)
        world_size = dist.get_world_size()
        return World(
            rank=dist.get_rank(),
            world_size=world_size,
            local_rank=local_rank,
            device=_rank_device(device, local_rank, world_size),
        )
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size == 1:
        return World(device=device)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = _rank_device(device, local_rank, world_size)
    if device.type == "cuda":
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device, owns_group=True)


def cleanup(world: World) -> None:
    """Destroy the process group if init_distributed created it."""
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """Rank 0, or the only process."""
    return not is_distributed() or dist.get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's `values` (host integers, the same count on every rank), in rank order."""
    if not is_distributed():
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.long)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(table, mine)
    return [row.tolist() for row in table]


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any: ranks must agree before a collective such as a checkpoint."""
    return any(row[0] for row in all_gather_ints([int(flag)]))


def locate(batch: Batch, counts: dict[str, int]) -> tuple[GlobalBatch, dict[str, int]]:
    """Where this rank's rows sit in the global batch, and `counts` (e.g. tokens per modality) summed over ranks.

    One all-gather of a few host integers per step: the images and the LM targets of each discrete
    modality on every rank give the loss's global denominators and this rank's first global image."""
    targets = {m: idx.numel() for m, idx in batch.loss_index.items()}  # same keys and order on every rank
    C, H, W = batch.images.shape[1:]
    table = all_gather_ints(
        [batch.images.shape[0], *targets.values(), *counts.values(), int(batch.image_clean.sum()), H, W]
    )  # (W, 1 + M + K + 3)
    rank = dist.get_rank() if is_distributed() else 0
    totals = [sum(column) for column in zip(*table)]
    lm = dict(zip(targets, totals[1:]))
    whole = GlobalBatch(
        text_targets=lm.pop("text"),
        images=totals[0],
        image_offset=sum(row[0] for row in table[:rank]),
        unit_targets=lm,
        ranks=len(table),
        image_shape=(C, max(row[-2] for row in table), max(row[-1] for row in table)),
        clean_images=totals[-3],
    )
    return whole, dict(zip(counts, totals[1 + len(targets) : -3]))


class Silent:
    """Stands in for a rank-0-only object (the training logger) on the other ranks: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

    def __enter__(self) -> Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
