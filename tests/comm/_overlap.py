"""Per-rank bodies: the two-half switch (launch, compute, wait) equals the blocking one."""

from __future__ import annotations

import torch

import dsp
from dsp.comm.overlap import launch_switch, wait_switch
from dsp.comm.primitives import switch
from dsp.comm.shards import shard_sizes
from dsp.mesh import group_info


def two_halves(shape=(2, 7, 5, 3), src=1, dst=2):
    """Value-encoded chunks switched in two halves, interleaved with compute, equal the
    blocking switch forward and backward, with the same bytes."""
    info = group_info(None)
    n, r = info.size, info.rank
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)
    srcs = shard_sizes(shape[src], n)
    x = full.narrow(src, sum(srcs[:r]), srcs[r]).clone().requires_grad_()
    w = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with dsp.comm_log() as blocking:
        ref = switch(x, src, dst, None, src_size=shape[src])
        (ref.square() * 0.5).sum().backward()
    gref = x.grad.clone()
    x.grad = None
    with dsp.comm_log() as log:
        handle = launch_switch(x, src, dst, srcs, shard_sizes(shape[dst], n), info)
        busy = (w @ w).sum()  # compute while the transfer is in flight
        y = wait_switch(handle)
        (y.square() * 0.5).sum().backward()
    assert busy.isfinite()
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    torch.testing.assert_close(x.grad, gref, atol=0, rtol=0)
    assert log.sent("forward") == blocking.sent("forward")
    assert log.sent("backward") == blocking.sent("backward")
    return log.sent("forward") + log.sent("backward")
