"""Walk a plan over a trace exactly as the hooks will: check it and count its bytes.

:func:`simulate` is the dry run: no process group, no collective. It follows each stream's
layout through the recorded calls (split at the entry, relayouts, switches around stages,
gathers of operands, the gather at the exit), raises :class:`PlanError` where the plan would
compute wrongly (a module that needs a dim whole runs while that dim is sharded, an operand
used whole is not gathered, an illegal shard for the world size), and returns the bytes of
every collective, summed over ranks, forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from dsp.parallelize.declared import Declarations
from dsp.parallelize.events import as_stream, events, gather_bytes, legal, switch_bytes
from dsp.parallelize.plan import Plan, PlanError, Stage
from dsp.parallelize.trace import Trace

__all__ = ["PlanCost", "simulate"]


@dataclass
class PlanCost:
    """Bytes sent by all ranks together, per item: ``"split x"``, ``"stage 3"``, ``"gather x"``."""

    world_size: int
    forward: Dict[str, int] = field(default_factory=dict)
    backward: Dict[str, int] = field(default_factory=dict)

    def add(self, label: str, fwd: int, bwd: int) -> None:
        self.forward[label] = self.forward.get(label, 0) + fwd
        self.backward[label] = self.backward.get(label, 0) + bwd

    def bytes(self, label: str) -> int:
        return self.forward.get(label, 0) + self.backward.get(label, 0)

    @property
    def total_forward(self) -> int:
        return sum(self.forward.values())

    @property
    def total_backward(self) -> int:
        return sum(self.backward.values())

    @property
    def total(self) -> int:
        return self.total_forward + self.total_backward


def _check_shard(plan_dim: Optional[str], stream, trace: Trace, n: int, even_only: bool, what):
    if plan_dim is None or plan_dim not in stream.seq:
        raise PlanError(
            f"{what}: shard {plan_dim!r} is not a sequence dim of stream {stream.name!r} "
            f"{stream.seq}"
        )
    length = trace.size(plan_dim)
    if not legal(length, n, even_only):
        why = "is not divisible by" if length >= n else "is shorter than"
        raise PlanError(
            f"{what}: dim {plan_dim!r} of length {length} {why} the world size {n}"
            + (" (even_only)" if length >= n else " (some ranks would hold empty shards)")
        )


def simulate(
    plan: Plan, trace: Trace, decl: Declarations, world_size: int, *, even_only: bool = False
) -> PlanCost:
    """Dry-run ``plan`` on ``trace`` for ``world_size`` ranks; see the module docstring."""
    n = world_size
    streams = {s.name: s for s in plan.streams}
    if {s.name for s in trace.streams} != set(streams):
        raise PlanError(
            f"the trace has streams {[s.name for s in trace.streams]}, the plan {list(streams)}"
        )
    compute: Dict[str, Tuple[int, Stage]] = {}
    relayout: Dict[Tuple[str, str], Tuple[int, Stage]] = {}
    gathers: Dict[str, Tuple[int, Stage]] = {}
    for i, st in enumerate(plan.stages):
        table = {"compute": compute, "gather_output": gathers}.get(st.kind)
        if table is None:
            relayout[(st.module, st.stream)] = (i, st)
        else:
            table[st.module] = (i, st)
    bounds: Dict[str, List[str]] = {}
    for name, mods in decl.boundaries.items():
        for b in mods:
            bounds.setdefault(b, []).append(name)
    stage_map = {m: (st.stream, st.out_stream) for m, (_, st) in compute.items()}
    cost = PlanCost(n)
    layout: Dict[str, Optional[str]] = {}
    stack: List[Tuple[Stage, str]] = []
    ran = set()
    gather_map = {m: st.stream for m, (_, st) in gathers.items()}
    for ev in events(trace, decl, stage_map, bounds, gather_map):
        stream = streams[ev.stream]
        if ev.kind == "entry":
            _check_shard(stream.shard, stream, trace, n, even_only, f"stream {stream.name!r}")
            layout[ev.stream] = stream.shard
            info = as_stream(ev, stream)
            cost.add(f"split {ev.stream}", 0, 0)  # grad_mode="shard": no backward bytes
        elif ev.kind == "exit":
            cost.add(f"gather {ev.stream}", gather_bytes(ev.info, n), 0)
            layout[ev.stream] = None
        elif ev.kind == "boundary" and (ev.module, ev.stream) in relayout:
            i, st = relayout[(ev.module, ev.stream)]
            _check_shard(st.shard, stream, trace, n, even_only, f"stage {i} ({st.module})")
            b = switch_bytes(as_stream(ev, stream), stream, layout[ev.stream], st.shard, n)
            cost.add(f"stage {i}", b, b if ev.info.grad else 0)
            layout[ev.stream] = st.shard
            ran.add(i)
        elif ev.kind == "stage":
            i, st = compute[ev.module]
            _check_shard(st.shard, stream, trace, n, even_only, f"stage {i} ({st.module})")
            b = switch_bytes(as_stream(ev, stream), stream, layout[ev.stream], st.shard, n)
            cost.add(f"stage {i}", b, b if ev.info.grad else 0)
            stack.append((st, layout[ev.stream]))
            layout[ev.stream] = st.shard
            ran.add(i)
        elif ev.kind == "stage_end":
            i = compute[ev.module][0]
            st, prev = stack.pop()
            layout[ev.stream] = prev
            if st.out_stream:
                target = streams[st.out_stream]
                _check_shard(st.out_shard, target, trace, n, even_only, f"stage {i} output")
                info = as_stream(ev, target)
                b = switch_bytes(info, target, st.out_shard, layout[st.out_stream], n)
            else:
                b = switch_bytes(as_stream(ev, stream), stream, st.shard, prev, n)
            cost.add(f"stage {i}", b, b if ev.info.grad else 0)
        elif ev.kind == "check" and layout[ev.stream] in ev.dims:
            raise PlanError(
                f"module {ev.module!r} computes over {ev.dims}, but the plan leaves stream "
                f"{ev.stream!r} sharded on {layout[ev.stream]!r} when it runs; add a stage for "
                "it (or for a module containing it) that shards another dim"
            )
        elif ev.kind == "operand":
            if ev.module not in gathers:
                user = decl.operands[ev.module][0]
                raise PlanError(
                    f"{user!r} uses the output of {ev.module!r} whole (full_operands), but the "
                    "plan has no gather_output stage for it"
                )
            i, st = gathers[ev.module]
            if st.shard is not None and st.shard != layout[ev.stream]:
                raise PlanError(
                    f"stage {i} gathers {ev.module!r} along {st.shard!r}, but stream "
                    f"{ev.stream!r} is sharded on {layout[ev.stream]!r} there"
                )
            b = gather_bytes(ev.info, n)
            cost.add(f"stage {i}", b, b if ev.info.grad else 0)
            ran.add(i)
    never = [f"{i} ({st.module})" for i, st in enumerate(plan.stages) if i not in ran]
    if never:
        raise PlanError(
            f"stages {never} never act: their modules do not run inside the sharded region "
            "(or a relayout is not at a block boundary of its stream)"
        )
    return cost
