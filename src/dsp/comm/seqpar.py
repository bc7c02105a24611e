"""Megatron-style sequence-parallel region boundaries as autograd functions.

* :func:`all_gather_seq`: all-gather along ``dim`` in forward, reduce-scatter in backward
  (the gathered tensor feeds tensor-parallel weights, so each rank's gradient is a partial sum).
* :func:`reduce_scatter_seq`: reduce-scatter along ``dim`` in forward (summing the partial
  outputs of row-parallel weights), all-gather in backward.

Shards follow ``torch.tensor_split`` (``sizes``: every rank's length of ``dim``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dsp.comm import collectives as C
from dsp.comm.primitives import gather_dim
from dsp.mesh import GroupInfo

__all__ = ["all_gather_seq", "reduce_scatter_seq"]


def _ag(x: torch.Tensor, dim: int, sizes: Sequence[int], info: GroupInfo) -> torch.Tensor:
    return gather_dim(x, dim, sizes, info, tag="seq_all_gather")


def _rs(x: torch.Tensor, dim: int, sizes: Sequence[int], info: GroupInfo) -> torch.Tensor:
    xm = x.movedim(dim, 0).contiguous()  # (L, *rest), partial sums
    inner = math.prod(xm.shape[1:])
    flat = C.reduce_scatter(xm, [s * inner for s in sizes], info.group, tag="seq_reduce_scatter")
    return flat.view(sizes[info.rank], *xm.shape[1:]).movedim(0, dim).contiguous()


class _AllGatherSeq(torch.autograd.Function):
    """All-gather in forward, reduce-scatter in backward."""

    @staticmethod
    def forward(ctx, x, dim, sizes, info):
        ctx.args = (dim, sizes, info)
        return _ag(x, dim, sizes, info)

    @staticmethod
    def backward(ctx, g):
        return _rs(g, *ctx.args), None, None, None


class _ReduceScatterSeq(torch.autograd.Function):
    """Reduce-scatter in forward, all-gather in backward."""

    @staticmethod
    def forward(ctx, x, dim, sizes, info):
        ctx.args = (dim, sizes, info)
        return _rs(x, dim, sizes, info)

    @staticmethod
    def backward(ctx, g):
        return _ag(g, *ctx.args), None, None, None


def all_gather_seq(x: torch.Tensor, dim: int, sizes: Sequence[int], info: GroupInfo):
    """Sharded on ``dim`` -> full; backward reduce-scatters (sums) the gradient."""
    if info.size == 1:
        return x
    return _AllGatherSeq.apply(x, dim, list(sizes), info)


def reduce_scatter_seq(x: torch.Tensor, dim: int, sizes: Sequence[int], info: GroupInfo):
    """Full partial sums -> this rank's shard of the sum; backward all-gathers."""
    if info.size == 1:
        return x
    return _ReduceScatterSeq.apply(x, dim, list(sizes), info)
