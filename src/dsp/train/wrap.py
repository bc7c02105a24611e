"""Wrap a model for training: activation checkpointing, then DDP / FSDP2 / manual all-reduce.

Order (as in torchtitan): the sequence-parallel strategy's hooks go on first (they act on
activations), then activation checkpointing (per block), then the data-parallel wrapper.

Gradients. With the strategies' convention (entry ``split(grad_mode="shard")``, exit
``gather(grad_scale="up")``, docs/primitives.md), each rank's gradient *averaged over its SP
group* is the gradient of its micro-batch's loss, and averaging that over the dp replicas
(equal micro-batches) gives the gradient of the global batch's mean loss. Averages compose,
so **one average over all dp x sp ranks** is exact. That is what every mode does, once:

* ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel` over the world group (its
  bucketed all-reduce averages over every rank);
* ``fsdp``: FSDP2 ``fully_shard`` on each block and the root over a 1-D mesh of all ranks
  (ZeRO-3: parameters, gradients and optimizer state sharded dp*sp ways; its reduce-scatter
  averages over every rank);
* ``manual``: one flat all-reduce per dtype through :mod:`dsp.comm.collectives` (counted by
  ``dsp.comm_log``), divided by the world size.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsp.comm import collectives as C

__all__ = [
    "DATA_PARALLEL",
    "apply_activation_checkpointing",
    "wrap_data_parallel",
    "average_gradients",
]

DATA_PARALLEL = ("ddp", "fsdp", "manual")


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in backward instead of storing them.

    Replaces ``block.forward`` by a non-reentrant :func:`torch.utils.checkpoint.checkpoint` of
    the original, so parameter names and the blocks' own hooks are unchanged (the strategy's
    entry split on ``blocks.0`` runs once, outside). Hooks *inside* a block (DSP's switches
    around the temporal attention) run again during the recomputation: activation
    checkpointing trades one more forward, communication included, for memory. Returns the
    number of blocks wrapped.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` to checkpoint")
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)


def wrap_data_parallel(
    model: nn.Module, kind: str, *, device: torch.device, world_size: int
) -> nn.Module:
    """Wrap ``model`` for data parallelism over all ranks (``ddp``, ``fsdp`` or ``manual``).

    Returns the module to call (the DDP wrapper for ``ddp``, the model itself otherwise).
    """
    if kind not in DATA_PARALLEL:
        raise ValueError(f"data parallelism must be one of {DATA_PARALLEL}, got {kind!r}")
    if not dist.is_initialized() or kind == "manual":
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp_sp",))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def average_gradients(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """Average every gradient over ``group`` (``None``: the world): one all-reduce per dtype,
    the same coalesced collective :meth:`dsp.parallelize.Parallelized.sync_grads` uses."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    C.all_reduce_coalesced(grads, group, average=True, tag="grad_sync")
