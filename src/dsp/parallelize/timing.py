"""How many overlapped slices each stage runs in: the planner's choice of ``Stage.chunks``.

A compute stage cut into ``k`` slices (:mod:`dsp.parallelize.chunks`) overlaps the switch of
one slice with the compute of another. With ``W`` the time of its switches (in and back,
priced per message, so ``k`` slices pay ``k`` times the latency) and ``c`` its compute on one
rank, one direction (forward, or backward) of the stage takes a three-stage pipeline's time

    T(k) = W_k + c - overlap * min(W_k, c) * (k - 1) / k + (k - 1) * slice_overhead

(``k = 1``: ``W + c``, everything exposed; ``k -> inf``: ``max(W, c)``). ``overlap`` is the
fraction of the shorter side that running both at once really hides: 1 where the
collective has its own engine (NCCL on a side stream, gloo's thread on a core of its own);
0 where ranks share cores, whose waits other ranks' compute already fills, so slicing only
adds overhead. ``slice_overhead`` is what one more slice costs whatever it overlaps (its
launch, the slicing and joining copies, smaller kernels). The backward of a training step
computes about twice the forward's FLOPs and sends the same bytes.

Compute comes from the FLOPs the recording counted per call (:class:`~dsp.parallelize.
trace.Call` ``flops``, ``torch.utils.flop_counter``), divided by ``N``; time per FLOP and the
link from a :class:`Timing` (``dsp.sim.plan_price.timing`` builds one for a described
cluster, ``dsp bench`` one for its emulated link).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

from dsp.parallelize.chunks import most_chunks
from dsp.parallelize.compile import Act, stage_hooks
from dsp.parallelize.cost import act_costs
from dsp.parallelize.declared import Declarations
from dsp.parallelize.plan import Plan, PlanError, Stage
from dsp.parallelize.trace import Trace

__all__ = ["Timing", "choose_chunks", "stage_time"]


@dataclass(frozen=True)
class Timing:
    """What choosing the slice count needs.

    Attributes:
        price: ``price(act, forward_bytes, backward_bytes) -> seconds`` of one act's
            collectives on one rank (:func:`dsp.sim.plan_price.link_price`).
        flop_seconds: seconds per FLOP on one rank (1 / achieved FLOP/s).
        overlap: the fraction of the shorter of communication and compute that running them
            at once hides (see the module doc).
        slice_overhead: seconds one more slice costs, per direction.
        training: price the backward too (twice the forward's compute); else forward only.
        max_chunks: the most slices tried (powers of two up to it).
        min_gain: the least relative gain (of the stage's time) worth slicing for.
    """

    price: Callable[[Act, int, int], float]
    flop_seconds: float
    overlap: float = 1.0
    slice_overhead: float = 0.0
    training: bool = True
    max_chunks: int = 8
    min_gain: float = 0.02

    def __post_init__(self):
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"Timing.overlap must be in [0, 1], got {self.overlap}")
        if self.flop_seconds < 0 or self.slice_overhead < 0 or self.max_chunks < 1:
            raise ValueError(f"Timing: negative time or max_chunks < 1 in {self}")


def stage_time(st: Stage, plan: Plan, trace: Trace, decl: Declarations, n: int, t: Timing):
    """Predicted seconds of ``st`` (as it is, ``st.chunks`` slices) over all its calls, one
    rank: ``(total, communication, compute)``; total as the module doc's ``T(k)``."""
    k = st.chunks or 1
    total = comm = comp = 0.0
    hooks = stage_hooks(0, st, plan, decl)  # compiled once, costed at every call
    for call in (c for c in trace.calls if c.module == st.module):
        fwd = bwd = 0.0
        for hook in hooks:
            for act, f, b in act_costs(hook, call, trace, n):
                fwd += t.price(act, f, 0) if f else 0.0
                bwd += t.price(act, 0, b) if b else 0.0
        c = call.flops / n * t.flop_seconds
        sides = [(fwd, c)] + ([(bwd, 2 * c)] if t.training else [])
        for w, work in sides:
            hidden = t.overlap * min(w, work) * (k - 1) / k
            total += w + work - hidden + (k - 1) * t.slice_overhead
            comm, comp = comm + w, comp + work
    return total, comm, comp


def choose_chunks(
    plan: Plan, trace: Trace, decl: Declarations, n: int, t: Timing
) -> Tuple[Plan, Dict[str, Dict[int, float]]]:
    """``plan`` with the slice count that :func:`stage_time` predicts fastest on every compute
    stage that can run overlapped (its only acts are its switch in and back; others stay
    blocking), and for each such stage the predicted seconds per candidate ``k``.

    Candidates: 1, 2, 4, ... up to ``t.max_chunks`` and to the number of slices of ``N``
    rows the dim holds. A ``k > 1`` is kept only if it gains ``t.min_gain`` of the stage's
    blocking time (slicing that gains noise is not worth its risk)."""
    if not any(c.flops for c in trace.calls):
        raise PlanError(
            "choosing the slice count needs each stage's compute: this recording has no "
            "FLOPs (it was declared from sizes, not run); record the model on example inputs "
            "(meta tensors are enough)"
        )
    stages = list(plan.stages)
    report: Dict[str, Dict[int, float]] = {}
    for i, st in enumerate(stages):
        most = most_chunks(st, plan, decl, trace, n, t.max_chunks)
        if most < 2:
            continue
        options: List[int] = [1]
        while options[-1] * 2 <= most:
            options.append(options[-1] * 2)
        times = {
            k: stage_time(dataclasses.replace(st, chunks=k if k > 1 else None), plan, trace,
                          decl, n, t)[0]
            for k in options
        }  # fmt: skip
        report[st.module] = times
        best = min(times, key=lambda k: (times[k], k))
        if best > 1 and times[1] - times[best] >= t.min_gain * times[1]:
            stages[i] = dataclasses.replace(st, chunks=best)
    return Plan(plan.streams, tuple(stages), plan.params), report
