"""Process groups: creation with timeouts, and resolution of the ``group`` argument.

Every communicating function in dsp takes its group explicitly (``None`` means the default
world group). Groups created here carry a timeout, so a dead or diverging peer ends the job
with an error instead of a hang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence

import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT",
    "GroupInfo",
    "group_info",
    "init_process_group",
    "new_group",
]

#: Default timeout of the groups dsp creates. Collectives that wait longer raise.
DEFAULT_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class GroupInfo:
    """A resolved group: the handle, this rank's index in it and its size."""

    group: Optional[dist.ProcessGroup]
    rank: int
    size: int


def group_info(group: Optional[dist.ProcessGroup] = None) -> GroupInfo:
    """Resolve ``group`` (``None``: the world) and check that this rank belongs to it.

    Raises:
        RuntimeError: torch.distributed is not initialised, or this rank is not a member.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "dsp: torch.distributed is not initialised; call dsp.init_process_group() "
            "(or torch.distributed.init_process_group) before using split/switch/gather"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(
            f"dsp: global rank {dist.get_rank()} is not a member of the given process group; "
            "pass a group that contains this rank"
        )
    return GroupInfo(group, rank, dist.get_world_size(group))


def init_process_group(
    backend: Optional[str] = None,
    *,
    timeout: timedelta = DEFAULT_TIMEOUT,
    **kwargs,
) -> None:
    """Initialise the default group (env:// rendezvous, as torchrun sets it) with a timeout.

    ``backend`` defaults to ``nccl`` when CUDA is available and ``LOCAL_RANK`` is set, else
    ``gloo``. Extra keyword arguments go to :func:`torch.distributed.init_process_group`.
    """
    if dist.is_initialized():
        return
    if backend is None:
        import torch

        use_nccl = torch.cuda.is_available() and "LOCAL_RANK" in os.environ
        backend = "nccl" if use_nccl else "gloo"
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)


def new_group(
    ranks: Optional[Sequence[int]] = None,
    *,
    timeout: timedelta = DEFAULT_TIMEOUT,
    backend: Optional[str] = None,
) -> Optional[dist.ProcessGroup]:
    """Create a sub-group with a timeout (all ranks must call it, as in torch)."""
    return dist.new_group(
        ranks=list(ranks) if ranks is not None else None, timeout=timeout, backend=backend
    )


def group_ranks(group: Optional[dist.ProcessGroup] = None) -> list:
    """Global ranks of ``group`` in group-rank order."""
    if group is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def split_group(
    group: Optional[dist.ProcessGroup], inner: int, *, timeout: timedelta = DEFAULT_TIMEOUT
) -> tuple:
    """Split ``group`` (size ``outer * inner``) into a 2-D grid; return this rank's groups.

    Group rank ``i`` sits at ``(i // inner, i % inner)``. Returns ``(inner_group,
    outer_group)``: the ``inner`` consecutive ranks sharing ``i // inner``, and the ``outer``
    ranks sharing ``i % inner``. Every rank of ``group`` must call this (it creates all
    sub-groups, in the same order everywhere).
    """
    ranks = group_ranks(group)
    n = len(ranks)
    if inner < 1 or n % inner:
        raise ValueError(f"dsp: cannot split a group of {n} ranks into rows of {inner}")
    me = dist.get_rank()
    mine_inner = mine_outer = None
    for row in range(n // inner):
        members = ranks[row * inner : (row + 1) * inner]
        g = new_group(members, timeout=timeout)
        if me in members:
            mine_inner = g
    for col in range(inner):
        members = ranks[col::inner]
        g = new_group(members, timeout=timeout)
        if me in members:
            mine_outer = g
    return mine_inner, mine_outer
