"""Data parallelism, activation checkpointing, compilation and precision, applied from outside the model.

The model (motfusion.models) is single-device code. `parallelize` changes it in place into what a
run trains, in torchtitan's order: per MoT block, activation checkpointing, then torch.compile;
then data parallelism over the processes torchrun started (train.parallel), with FSDP2
(`fully_shard`) on each MoT block and then on the root (adapters, heads, final norm):

- none: the model as is; the only choice for one process (ddp and fsdp then mean none too).
- fsdp: weights, gradients and AdamW state sharded over the W ranks; a block's weights are
  all-gathered just before it runs and freed after, gradients are reduce-scattered. Checkpoints
  are sharded too (torch.distributed.checkpoint, see training/checkpoint.py).
- ddp: data parallelism with full replicas: the same FSDP2 units over a (W, 1) mesh, i.e. shards
  of size 1 replicated W times. Every rank holds all weights and optimizer state, nothing is
  gathered, and each block's gradients are all-reduced as soon as its backward is done.
  Checkpoints are full files written by rank 0.

auto is ddp with several processes: replicas cost 16 bytes per parameter per GPU (fp32 weights,
gradients, two AdamW moments), fine up to the 1.4b recipe on 80 GB; fsdp is for larger models.

Why not torch's DistributedDataParallel: the objective calls the output heads after forward has
returned (DDP's find_unused_parameters then fails), and a rank whose rows lack a modality leaves
that tower's weights without a gradient, so without it the ranks' bucketed all-reduces no longer
match and training hangs. FSDP2 keeps the root gathered after forward and reduces zeros for the
weights a rank did not use (`set_reduce_scatter_unused_params`): both cases work (a test covers
the second), and ddp and fsdp share one code path.

Both average gradients over ranks; the training step scales the loss by the world size, because
each rank's loss is its share of the global mean (objectives.GlobalBatch).

Precision (train.precision=bf16) is torch.autocast(bfloat16) around forward and loss, the same for
every mode and device: weights, gradients, their reduction and the optimizer stay fp32. On CPU it
pays only with AMX (Intel Sapphire Rapids and later): the demo step takes 0.69 of fp32's time there
(about 0.84 over whole runs), against 0.97 with AVX512-BF16, 1.8 with AVX-512 alone and 11 with
AVX2 (benchmarks/precision.py: oneDNN limited by ONEDNN_MAX_CPU_ISA), so train.precision=auto (the
demo recipes) takes bf16 only where it is fast: a CPU with AMX, or a CUDA device with bf16. FSDP's
own bf16 parameter casting is not used: it casts every floating input of the model, the diffusion
timesteps included (999 rounds to 1000 in bf16), while the model keeps timesteps, RoPE angles and
norms in fp32 on purpose.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.checkpoint import checkpoint

from motfusion.config import TrainConfig
from motfusion.errors import ConfigError
from motfusion.models.transfusion import TransfusionModel
from motfusion.training.distributed import World


def parallel_mode(tcfg: TrainConfig, world_size: int) -> str:
    """train.parallel resolved for this world: none, ddp or fsdp."""
    if world_size == 1:
        return "none"
    if tcfg.parallel == "none":
        raise ConfigError(
            f"train.parallel=none with {world_size} processes would train {world_size} "
            "unsynchronized copies: use train.parallel=auto, ddp or fsdp"
        )
    return "ddp" if tcfg.parallel == "auto" else tcfg.parallel


def parallelize(model: TransfusionModel, tcfg: TrainConfig, world: World) -> TransfusionModel:
    """Apply train.activation_checkpointing, train.compile and train.parallel to `model`, in place.

    Parameter names do not change, so checkpoints do not depend on these settings. Build the
    optimizer after this call: FSDP replaces the parameters with sharded (DTensor) ones."""
    for block in model.backbone.blocks:
        forward = block.forward
        if tcfg.activation_checkpointing:
            forward = recompute_in_backward(forward)
        if tcfg.compile:
            forward = torch.compile(forward)
        block.forward = forward  # an instance attribute: nn.Module.__call__ runs it, hooks around it
    mode = parallel_mode(tcfg, world.world_size)
    if mode != "none":
        shard(model, world, replicate=mode == "ddp")
    return model


def recompute_in_backward(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` whose activations are not kept for backward but recomputed there (non-reentrant)."""

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return checkpointed


def shard(model: TransfusionModel, world: World, replicate: bool = False) -> None:
    """FSDP2 over all ranks, each MoT block one unit and the root the rest; `replicate`: shards of size 1."""
    W = world.world_size
    if replicate:
        mesh = init_device_mesh(world.device.type, (W, 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(world.device.type, (W,), mesh_dim_names=("shard",))
    blocks = model.backbone.blocks
    for i, block in enumerate(blocks):
        # The last block's weights would be gathered again at once: backward starts with it.
        fully_shard(block, mesh=mesh, reshard_after_forward=i < len(blocks) - 1)
    # The root stays gathered after forward: the objective calls the output heads (model.logits)
    # after forward has returned, outside FSDP's hooks, and backward needs the root's weights first.
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    model.set_reduce_scatter_unused_params(True)  # weights this rank did not use get zero gradients
    # FSDP2 warns that a block returns a view (x.view(B, T, D)); nothing writes to it in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision resolved for a device: auto is bf16 where bf16 is fast (see above), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        fast = device.type == "cpu" and torch.cpu._is_amx_tile_supported()
    return "bf16" if fast else "fp32"


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The context forward and loss run in: bfloat16 autocast for bf16 (auto where it resolves so),
    else a no-op."""
    enabled = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
