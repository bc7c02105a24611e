"""Per-rank bodies: group norms whose statistics span a sharded dim."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dsp
from dsp.comm.shards import shard_sizes
from dsp.parallelize.norms import NormMode, norm_bytes


def _sum(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


def group_norm_on_row_shards(shape=(2, 6, 5, 7, 3), groups=3, dim=3):
    """``F.group_norm`` of a ``(B, C, F, H, W)`` tensor sharded on ``dim`` (rows) equals one
    process's, forward and backward; the bytes are :func:`norm_bytes`'s."""
    rank, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
    w = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_()
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = F.group_norm(x, groups, w, b, 1e-6)
    (ref * up).sum().backward()
    gx, gw, gb = x.grad.clone(), w.grad.clone(), b.grad.clone()
    lens = shard_sizes(shape[dim], n)
    start = sum(lens[:rank])
    xs = x.detach().narrow(dim, start, lens[rank]).clone().requires_grad_()
    w.grad = b.grad = None
    with dsp.comm_log() as log:
        with NormMode(None, "test norm"):
            out = F.group_norm(xs, groups, w, b, 1e-6)
        (out * up.narrow(dim, start, lens[rank])).sum().backward()
    torch.testing.assert_close(out, ref.narrow(dim, start, lens[rank]), atol=1e-12, rtol=0)
    torch.testing.assert_close(xs.grad, gx.narrow(dim, start, lens[rank]), atol=1e-12, rtol=0)
    torch.testing.assert_close(_sum(w.grad), gw, atol=1e-10, rtol=0)
    torch.testing.assert_close(_sum(b.grad), gb, atol=1e-10, rtol=0)
    fwd, bwd = norm_bytes(shape, groups, 8, True, n)
    return {"forward": log.sent("forward"), "backward": log.sent("backward"), "f": fwd, "b": bwd}
