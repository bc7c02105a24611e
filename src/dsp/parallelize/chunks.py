"""Overlapped switches: how a chunked stage's slices are cut, what they send, where they apply.

A ``compute`` stage with ``chunks=k`` runs its module on ``k`` slices of the dim it runs on
(:meth:`~dsp.parallelize.runtime.Runtime.chunked`, :mod:`dsp.comm.overlap`); its acts are
one ``chunked`` act (:func:`~dsp.parallelize.compile.stage_hooks`). This module holds what
the interpreter, the dry run and the planner share about it.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

from dsp.comm.shards import shard_sizes
from dsp.parallelize.compile import Act, _switch_bytes, stage_hooks
from dsp.parallelize.declared import Declarations
from dsp.parallelize.plan import Plan, PlanError, Stage
from dsp.parallelize.trace import TensorInfo, Trace

__all__ = ["chunked_bytes", "chunks_of", "most_chunks", "slice_counts", "with_chunks"]


def chunks_of(length: int, k: int) -> List[int]:
    """Lengths of the ``k`` slices of a chunked stage's dim (even, the first ones longer)."""
    return shard_sizes(length, k)


def chunked_bytes(
    act: Act, x: TensorInfo, out: TensorInfo, sizes: Dict[str, int], n: int
) -> Tuple[int, int]:
    """``(forward, backward)`` bytes all ranks send for a ``chunked`` act: every slice
    switched in and back (``sizes`` bound from both tensors)."""
    if n == 1:
        return 0, 0
    fwd = bwd = 0
    for piece in chunks_of(sizes[act.dst], act.degree):
        local = dict(sizes, **{act.dst: piece})
        for lay, t in ((act.layout, x), (act.out, out)):  # each switch's gradient goes back
            b = _switch_bytes(lay.unfolded(local), lay, act.src, act.dst, n, t.itemsize)
            fwd, bwd = fwd + b, bwd + (b if t.grad else 0)
    return fwd, bwd


def most_chunks(st: Stage, plan: Plan, decl: Declarations, trace: Trace, n: int, k: int) -> int:
    """The most slices, at most ``k``, stage ``st`` can run in: 1 unless it is a compute
    stage whose only acts are its switch in and back, on a stream dim holding at least two
    slices of ``n`` rows (companions, buffers or norms on its dim keep it blocking)."""
    if st.kind != "compute" or st.shard == st.rest or st.shard not in dict(trace.sizes):
        return 1
    c = min(k, trace.size(st.shard) // n)
    if c < 2:
        return 1
    try:
        stage_hooks(0, dataclasses.replace(st, chunks=c), plan, decl)
    except PlanError:
        return 1
    return c


def with_chunks(plan: Plan, trace: Trace, decl: Declarations, n: int, k: int) -> Plan:
    """``plan`` with ``chunks`` on every compute stage that can run overlapped: ``k``, or
    fewer where its dim holds fewer (:func:`most_chunks`)."""
    stages = []
    for st in plan.stages:
        c = most_chunks(st, plan, decl, trace, n, k)
        stages.append(dataclasses.replace(st, chunks=c) if c > 1 else st)
    return Plan(plan.streams, tuple(stages), plan.params)


def slice_counts(plan) -> List[int]:
    """The distinct slice counts of ``plan``'s compute stages (1: blocking; [] for none)."""
    if plan is None:
        return []
    return sorted({st.chunks or 1 for st in plan.stages if st.kind == "compute"})
