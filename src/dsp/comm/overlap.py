"""A switch in two halves: *launch* the all-to-all, *wait* for it later; both differentiable.

Between :func:`launch_switch` and :func:`wait_switch` the caller computes something else (the
previous chunk of a stage), so the transfer overlaps compute. The backward is overlapped the
same way, with no extra machinery: autograd runs nodes in reverse order of creation, so
when a stage launches every chunk's switch, then per chunk waits, computes and launches the
switch back, and finally waits for every switch back, the backward launches every
gradient's switch first and waits for each only when its chunk's backward needs it.

==============  ======================================  ======================================
half            forward                                 backward
==============  ======================================  ======================================
launch          pack; start the all-to-all ``src->dst``  wait for the gradient's all-to-all;
                                                        unpack (the gradient of ``x``)
wait            wait; unpack (the switched tensor)       pack the gradient; start its
                                                        all-to-all ``dst->src``
==============  ======================================  ======================================

The transfers are :func:`dsp.comm.collectives.all_to_all_async`: bytes recorded when they
start, the time spent waiting recorded by :func:`dsp.comm.log.timed`.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from dsp.comm import collectives as C
from dsp.comm.primitives import _block_shape, _pack, _unpack
from dsp.mesh import GroupInfo

__all__ = ["Pending", "drain", "in_flight", "launch_switch", "wait_switch"]

_STARTED = [0, 0]  # transfers started, transfers waited for (this process)


def in_flight() -> int:
    """Transfers started here and not yet waited for (0 between steps: none abandoned)."""
    return _STARTED[0] - _STARTED[1]


class Pending:
    """One switch in flight: its work handle and what the other half needs."""

    def __init__(self):
        self.work = None
        self.recv: Optional[torch.Tensor] = None
        self.keep: List[torch.Tensor] = []  # buffers alive until the transfer ends
        self.shape: Sequence[int] = ()
        self.args: tuple = ()


def _start(x, src, dst, src_sizes, dst_sizes, info: GroupInfo, pending: Pending) -> torch.Tensor:
    """Pack ``x`` (sharded on ``src``) and start its all-to-all to ``dst``; returns the send
    buffer (the transfer fills ``pending.recv``)."""
    n, r = info.size, info.rank
    send, send_splits = _pack([x], dst, [dst_sizes], n)
    shape = _block_shape(x.shape, [src, dst], [sum(src_sizes), dst_sizes[r]])
    inner = math.prod(_block_shape(shape, [src], [1]))
    recv_splits = [s * inner for s in src_sizes]
    recv, pending.work = C.all_to_all_async(
        send, send_splits, recv_splits, info.group, tag="switch"
    )
    pending.recv, pending.keep, pending.shape = recv, [send, recv], shape
    pending.args = (src, src_sizes)
    _STARTED[0] += 1
    return send


def _finish(pending: Pending) -> torch.Tensor:
    """Wait for the transfer and unpack it."""
    pending.work.wait()  # timed
    _STARTED[1] += 1
    src, src_sizes = pending.args
    out = _unpack(pending.recv, [pending.shape], src, [src_sizes], len(src_sizes))[0]
    pending.work, pending.keep = None, []
    return out


class _Launch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, dst, src_sizes, dst_sizes, info, pending):
        ctx.pending = Pending()  # the gradient's transfer (started by _Wait.backward)
        pending.back = ctx.pending
        ctx.x_shape = x.shape
        send = _start(x, src, dst, src_sizes, dst_sizes, info, pending)
        return send.new_empty(1)  # stands for the transfer in the graph (no data)

    @staticmethod
    def backward(ctx, _g):
        g = _finish(ctx.pending)
        return g.reshape(ctx.x_shape), None, None, None, None, None, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, pending, src, dst, src_sizes, dst_sizes, info):
        ctx.args = (dst, src, dst_sizes, src_sizes, info)
        ctx.back = pending.back
        ctx.token_shape = token.shape
        return _finish(pending)

    @staticmethod
    def backward(ctx, g):
        dst, src, dst_sizes, src_sizes, info = ctx.args
        _start(g.contiguous(), dst, src, dst_sizes, src_sizes, info, ctx.back)
        return g.new_empty(ctx.token_shape), None, None, None, None, None, None


def launch_switch(
    x: torch.Tensor,
    src: int,
    dst: int,
    src_sizes: Sequence[int],
    dst_sizes: Sequence[int],
    info: GroupInfo,
):
    """Start switching ``x`` from sharded on ``src`` to sharded on ``dst``; returns a handle
    for :func:`wait_switch`."""
    pending = Pending()
    token = _Launch.apply(x, src, dst, list(src_sizes), list(dst_sizes), info, pending)
    return (token, pending, src, dst, list(src_sizes), list(dst_sizes), info)


def wait_switch(handle) -> torch.Tensor:
    """The switched tensor of a :func:`launch_switch` handle (waits for the transfer)."""
    return _Wait.apply(*handle)


def drain(handles) -> None:
    """Wait for every transfer of these :func:`launch_switch` handles still in flight,
    outside autograd: what a stage interrupted between a launch and its wait (activation
    checkpointing's recompute stops early by raising) must do, so that no transfer all ranks
    started is left running with its buffers."""
    for handle in handles:
        pending = handle[1]
        if pending.work is not None:
            pending.work.wait()
            _STARTED[1] += 1
            pending.work, pending.keep = None, []
