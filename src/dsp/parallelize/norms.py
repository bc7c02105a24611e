"""Group normalization whose statistics span a sharded dim: partial sums, summed over ranks.

A module that normalizes over frames and rows together (AnimateDiff's motion modules, SVD's
temporal ResNets: ``GroupNorm`` on ``(B, C, F, H, W)``) can still run with one of those dims
sharded: each rank sums its part of every (sample, group), the sums are all-reduced, and
every rank normalizes its own elements with the global mean and variance. Two passes (the
mean, then the squared deviations from it), as a single process computes them; exact up to
the order of a sum. Statistics are kept in at least fp32 (bf16 inputs too).

=================  =========================================  ============================
collective         forward                                    backward
=================  =========================================  ============================
all-reduce (sum)   ``(2, N, G)``: partial sums and counts      the gradient, all-reduced
all-reduce (sum)   ``(N, G)``: partial squared deviations      the gradient, all-reduced
=================  =========================================  ============================
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dsp.comm import collectives as C

__all__ = ["NormMode", "group_norm_sharded", "norm_bytes"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks in forward; the gradient summed over ranks in backward (every rank's
    elements used the same statistics)."""

    @staticmethod
    def forward(ctx, x, group, tag):
        ctx.group, ctx.tag = group, tag
        return C.all_reduce(x.contiguous().clone(), group, tag=tag)

    @staticmethod
    def backward(ctx, g):
        return C.all_reduce(g.contiguous().clone(), ctx.group, tag=ctx.tag), None, None


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are summed in: the input's, at least fp32."""
    return torch.promote_types(dtype, torch.float32)


def group_norm_sharded(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    group: Optional[dist.ProcessGroup],
    tag: str = "norm",
) -> torch.Tensor:
    """``F.group_norm`` of the tensor whose shards (over the dims after the channels) the
    ranks of ``group`` hold; each rank gets its own shard of the result."""
    n, c = x.shape[0], x.shape[1]
    dt = stats_dtype(x.dtype)
    xg = x.reshape(n, num_groups, -1).to(dt)
    count = torch.full((n, num_groups), float(xg.shape[-1]), dtype=dt, device=x.device)
    sums = _AllReduceSum.apply(torch.stack([xg.sum(-1), count]), group, tag)
    total = sums[1].detach()
    mean = sums[0] / total
    d = xg - mean[..., None]
    var = _AllReduceSum.apply((d * d).sum(-1), group, tag) / total
    y = (d * torch.rsqrt(var + eps)[..., None]).reshape(x.shape).to(x.dtype)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def norm_bytes(shape: Tuple[int, ...], groups: int, itemsize: int, grad: bool, n: int):
    """``(forward, backward)`` bytes all ranks send for one sharded ``group_norm`` call on an
    input whose batch (first) dim is ``shape[0]``: two ring all-reduces, as logged."""
    if n == 1:
        return 0, 0
    e = max(itemsize, 4)
    m = shape[0] * groups
    per_rank = (2 * m * e * 2 * (n - 1)) // n + (m * e * 2 * (n - 1)) // n
    b = n * per_rank
    return b, b if grad else 0


class NormMode(TorchFunctionMode):
    """Reroutes ``group_norm`` calls to :func:`group_norm_sharded` over ``group``."""

    def __init__(self, group: Optional[dist.ProcessGroup], tag: str):
        super().__init__()
        self.group, self.tag = group, tag

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.group_norm:
            return group_norm_sharded(*_norm_arguments(args, kwargs), self.group, self.tag)
        return func(*args, **kwargs)


def _norm_arguments(args: tuple, kwargs: dict):
    """``(input, num_groups, weight, bias, eps)`` of an ``F.group_norm`` call."""
    names = ("input", "num_groups", "weight", "bias", "eps")
    defaults = {"weight": None, "bias": None, "eps": 1e-5}
    values = dict(zip(names, args))
    values.update(kwargs)
    return tuple(values.get(k, defaults.get(k)) for k in names)
