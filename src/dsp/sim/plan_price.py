"""Time on a described cluster as the planner's price per collective.

:func:`link_price` turns one act of a compiled plan (its op and its bytes summed over ranks,
forward and backward) into seconds with the cluster's link model
(:func:`dsp.sim.step.comm_seconds`: latency per call, the link the group spans, all-to-all
efficiency). Passed as ``price=`` to :meth:`dsp.parallelize.Recording.plan`, the planner
minimizes predicted communication time instead of bytes.
"""

from __future__ import annotations

from typing import Callable

from dsp.parallelize.timing import Timing
from dsp.sim.hardware import Cluster
from dsp.sim.step import comm_seconds

__all__ = ["link_price", "timing"]

#: the collective each act issues, in the link model's kinds
KINDS = {
    "switch": "a2a",
    "gather": "all_gather",
    "allgather": "all_gather",
    "reducescatter": "reduce_scatter",
    "chunked": "a2a",
}
ATTEND = {"heads": "a2a", "usp": "a2a", "ring": "p2p"}


def _calls(act, n: int):
    """Messages per direction: a heads stage's four all-to-alls, a ring's N-1 steps (its
    backward passes k, v and their gradients: twice), one collective otherwise."""
    if act.op == "attend" and act.kind == "ring":
        return n - 1, 2 * (n - 1)
    if act.op == "attend":
        return 4, 4
    if act.op == "chunked":  # every slice switched in and back
        return 2 * act.degree, 2 * act.degree
    return 1, 1


def link_price(cluster: Cluster, world_size: int, *, itemsize_scale: float = 1.0) -> Callable:
    """``price(act, forward_bytes, backward_bytes) -> seconds`` on ``cluster`` for a group of
    ``world_size`` consecutive ranks. ``itemsize_scale`` rescales recorded bytes (0.5: the
    recording was fp32, the target runs bf16)."""
    n = world_size

    def price(act, fwd: int, bwd: int) -> float:
        kind = ATTEND.get(act.kind) if act.op == "attend" else KINDS.get(act.op)
        if kind is None:
            return 0.0
        total = 0.0
        for nbytes, calls in zip((fwd, bwd), _calls(act, n)):
            if nbytes:
                per_rank = itemsize_scale * nbytes / n
                ring = n if kind == "p2p" else 0
                total += comm_seconds(cluster, kind, per_rank, span=n, calls=calls, ring=ring)
        return total

    return price


def timing(
    cluster: Cluster,
    world_size: int,
    *,
    training: bool = True,
    itemsize_scale: float = 1.0,
    max_chunks: int = 8,
) -> Timing:
    """What the planner needs to choose each stage's overlapped slices on ``cluster``
    (``Recording.plan(..., chunks="auto", timing=...)``): its link price, seconds per FLOP at
    the GPU's achieved rate, and the cluster's ``overlap`` and ``slice_overhead``."""
    return Timing(
        link_price(cluster, world_size, itemsize_scale=itemsize_scale),
        1.0 / cluster.gpu.flops,
        overlap=cluster.overlap,
        slice_overhead=cluster.slice_overhead,
        training=training,
        max_chunks=max_chunks,
    )
