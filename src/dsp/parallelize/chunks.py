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
from dsp.parallelize.plan import Plan, PlanError
from dsp.parallelize.trace import TensorInfo, Trace

__all__ = ["chunked_bytes", "chunks_of", "with_chunks"]


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


def with_chunks(plan: Plan, trace: Trace, decl: Declarations, n: int, k: int) -> Plan:
    """``plan`` with ``chunks`` on every compute stage that can run overlapped (its only acts
    are its switch in and back, on a stream dim): ``k``, or fewer where the dim holds fewer
    than ``k`` slices of ``n`` rows."""
    stages = list(plan.stages)
    for i, st in enumerate(stages):
        if st.kind != "compute" or st.shard == st.rest or st.shard not in dict(trace.sizes):
            continue
        c = min(k, trace.size(st.shard) // n)
        if c < 2:
            continue
        cand = dataclasses.replace(st, chunks=c)
        try:
            stage_hooks(i, cand, plan, decl)
        except PlanError:
            continue  # companions, buffers or norms on its dim: stays blocking
        stages[i] = cand
    return Plan(plan.streams, tuple(stages), plan.params)
