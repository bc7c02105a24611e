"""Shard sizes: which part of a dim each rank holds (``torch.tensor_split`` convention)."""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from dsp.mesh import group_info

__all__ = ["shard_sizes", "shard_offsets", "local_shard", "normalize_dim"]


def shard_sizes(length: int, world_size: int) -> List[int]:
    """Lengths of the ``world_size`` shards of a dim of ``length``.

    The first ``length % world_size`` shards are one longer, exactly as
    ``torch.tensor_split`` splits. Shards may be empty when ``length < world_size``.

    >>> shard_sizes(10, 4)
    [3, 3, 2, 2]
    """
    if world_size < 1:
        raise ValueError(f"dsp.shard_sizes: world_size must be >= 1, got {world_size}")
    if length < 0:
        raise ValueError(f"dsp.shard_sizes: length must be >= 0, got {length}")
    q, r = divmod(length, world_size)
    return [q + 1 if i < r else q for i in range(world_size)]


def shard_offsets(length: int, world_size: int) -> List[int]:
    """Start index of each shard (``world_size + 1`` entries; the last is ``length``)."""
    offs = [0]
    for s in shard_sizes(length, world_size):
        offs.append(offs[-1] + s)
    return offs


def normalize_dim(dim: int, ndim: int, what: str = "dim") -> int:
    """Map a possibly negative dim into ``[0, ndim)`` or raise a clear ``IndexError``."""
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"dsp: {what}={dim} is out of range for a tensor with {ndim} dims "
            f"(expected -{ndim} <= {what} < {ndim})"
        )
    return dim % ndim


def local_shard(
    x: torch.Tensor, dim: int, group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """The part of the full tensor ``x`` along ``dim`` that this rank of ``group`` holds.

    No communication and no autograd bookkeeping beyond a view; see :func:`dsp.split` for the
    differentiable version.
    """
    info = group_info(group)
    d = normalize_dim(dim, x.dim())
    offs = shard_offsets(x.shape[d], info.size)
    return x.narrow(d, offs[info.rank], offs[info.rank + 1] - offs[info.rank])
