"""The automatic switch planner: where to shard each stream so that the fewest bytes move.

Stages (the outermost modules that compute over some of a stream's sequence dims) and the
shapes at each come from a recording (:func:`record`). Dynamic programming over the events
in forward order; the state is the resting layout (sharded dim) of every stream:

* at a stream's entry: any legal dim (split: nothing sent, its backward neither);
* at a block boundary: keep the layout, or relayout (one switch of the block input);
* at a stage: shard any legal dim it does not compute over; if it is not the resting one,
  switch the input there and the output back (or into the output stream's layout);
  operands used whole are gathered (cost independent of the layout, counted all the same);
* at the exit: gather.

The cost is ``(bytes, imbalance)`` compared lexicographically: exact bytes of every
collective summed over ranks, forward and backward, then the sum over choices of
``imbalance(dim)`` (how much larger the largest shard is than an even share), so that ties
go towards even load. ``even_only`` forbids dims whose length the world size does not divide;
dims shorter than the world size are never sharded.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from dsp.parallelize.cost import PlanCost, simulate
from dsp.parallelize.declared import Declarations, read_declarations, stage_modules, stream_of
from dsp.parallelize.events import Event, events, gather_bytes, imbalance, legal, switch_bytes
from dsp.parallelize.plan import Plan, PlanError, Stage, Stream
from dsp.parallelize.trace import TensorInfo, Trace, declare_trace, trace_model

__all__ = ["Recording", "plan_model", "record"]

Cost = Tuple[int, Fraction]


@dataclass
class _Site:
    """One decision point: an entry, boundary, stage (with its operands), operand or exit."""

    ev: Event
    compute: Tuple[str, ...] = ()
    shard_map: Optional[Dict[str, str]] = None
    out_stream: Optional[str] = None
    end: Optional[Event] = None
    operands: Tuple[Event, ...] = ()


@dataclass
class Recording:
    """A model's streams, declarations, stages and recorded calls: what plans are made from."""

    streams: Tuple[Stream, ...]
    decl: Declarations
    trace: Trace
    stages: Dict[str, Tuple[str, Tuple[str, ...]]]  # module -> (stream, compute dims)

    def cost(self, plan: Plan, world_size: int, *, even_only: bool = False) -> PlanCost:
        """Dry-run ``plan``: check it and count its bytes (see :func:`simulate`)."""
        return simulate(plan, self.trace, self.decl, world_size, even_only=even_only)

    def plan(self, world_size: int, *, even_only: bool = False) -> Plan:
        """The plan with the fewest bytes (ties: the most even shards)."""
        best_cost, choices = _Search(self, world_size, even_only).run(_sites(self))
        plan = _build(self, choices)
        check = self.cost(plan, world_size, even_only=even_only).total
        if check != best_cost[0]:  # the planner and the dry run must agree to the byte
            raise RuntimeError(f"dsp planner: planned {best_cost[0]} bytes, dry run {check}")
        return plan


def record(
    model: nn.Module,
    inputs: Any,
    *,
    streams: Optional[Sequence[Stream]] = None,
    compute: Optional[Mapping[str, Any]] = None,
    operands: Optional[Mapping[str, Any]] = None,
    itemsize: int = 4,
) -> Recording:
    """Record ``model``: run it on ``inputs`` (a tuple of example inputs, tiny or on the meta
    device) or take ``inputs`` as declared dim sizes (a mapping ``{"T": 16, ...}``).

    Args:
        streams: the streams; default: :func:`dsp.parallelize.plans.default_streams`.
        compute, operands: ``{module name pattern: dims}`` declarations for models without
            ``compute_dim``/``full_operands`` attributes.
        itemsize: element size for declared sizes.
    """
    if streams is None:
        from dsp.parallelize.plans import default_streams

        streams = default_streams(model)
    streams = tuple(streams)
    decl = read_declarations(model, streams, compute, operands)
    stages = stage_modules(model, decl, streams)
    if isinstance(inputs, Mapping):
        trace = declare_trace(model, streams, inputs, itemsize=itemsize)
    else:
        trace = trace_model(model, inputs, streams)
    return Recording(streams, decl, trace, stages)


def plan_model(
    model: nn.Module, inputs: Any, world_size: int, *, even_only: bool = False, **options
) -> Plan:
    """The planner's plan for ``model`` on ``world_size`` ranks (options as :func:`record`)."""
    return record(model, inputs, **options).plan(world_size, even_only=even_only)


def _sites(rec: Recording) -> List[_Site]:
    """The recording's events grouped into decision points, in forward order."""
    outs = {}
    for m, smap in rec.decl.shard_maps.items():
        outs[m] = stream_of(tuple(smap.values()), rec.streams, f"{m!r} shard_map").name
    stage_map = {m: (s, outs.get(m)) for m, (s, _) in rec.stages.items()}
    bounds: Dict[str, List[str]] = {}
    for stream, modules in rec.decl.boundaries.items():
        for m in modules:
            bounds.setdefault(m, []).append(stream)
    sites: List[_Site] = []
    open_stage: Optional[_Site] = None
    for ev in events(rec.trace, rec.decl, stage_map, bounds):
        if ev.kind == "stage":
            smap = rec.decl.shard_maps.get(ev.module)
            open_stage = _Site(ev, rec.stages[ev.module][1], smap, outs.get(ev.module))
            sites.append(open_stage)
        elif ev.kind == "stage_end":
            open_stage.end, open_stage = ev, None
        elif ev.kind == "operand" and open_stage is not None:
            open_stage.operands += (ev,)
        elif ev.kind in ("entry", "boundary", "operand", "exit"):
            sites.append(_Site(ev))
    return sites


class _Search:
    """Dynamic programming over sites; state: the resting layout of every stream."""

    def __init__(self, rec: Recording, n: int, even_only: bool):
        self.streams = {s.name: s for s in rec.streams}
        self.order = [s.name for s in rec.streams]
        self.size, self.n, self.even_only = rec.trace.size, n, even_only

    def legal_dims(self, stream: Stream, exclude=(), within=None) -> List[str]:
        return [
            d
            for d in stream.seq
            if d not in exclude
            and (within is None or d in within)
            and legal(self.size(d), self.n, self.even_only)
        ]

    def switch(self, info: TensorInfo, stream: Stream, a: Optional[str], b: str) -> int:
        """Forward and (if the tensor requires grad) backward bytes of one switch."""
        return switch_bytes(info, stream, a, b, self.n) * (2 if info.grad else 1)

    def gather(self, info: TensorInfo) -> int:
        """All-gather forward, reduce-scatter backward."""
        return gather_bytes(info, self.n) * (2 if info.grad else 1)

    def run(self, sites: List[_Site]) -> Tuple[Cost, List]:
        best: Dict[Tuple, Tuple[Cost, List]] = {(None,) * len(self.order): ((0, Fraction(0)), [])}
        for site in sites:
            new: Dict[Tuple, Tuple[Cost, List]] = {}
            for state, (cost, choices) in best.items():
                for nxt, step, choice in self.options(site, state):
                    total = (cost[0] + step[0], cost[1] + step[1])
                    if nxt not in new or total < new[nxt][0]:
                        new[nxt] = (total, choices + ([choice] if choice else []))
            if not new:
                stream = self.streams[site.ev.stream]
                raise PlanError(
                    f"no legal dim to shard stream {stream.name!r} at its entry "
                    f"{stream.entry!r}: sequence dims "
                    f"{ {d: self.size(d) for d in stream.seq} }, world size {self.n}"
                    + (", even_only" if self.even_only else "")
                )
            best = new
        return min(best.values(), key=lambda v: v[0])

    def options(self, site: _Site, state: Tuple) -> List[Tuple[Tuple, Cost, Any]]:
        """``(next state, (bytes, imbalance), choice)`` for each legal choice at ``site``."""
        ev = site.ev
        stream = self.streams[ev.stream]
        k = self.order.index(ev.stream)
        cur = state[k]

        def put(d):
            return state[:k] + (d,) + state[k + 1 :]

        if ev.kind == "entry":  # nothing sent either way (grad_mode="shard")
            split = 0
            return [
                (put(d), (split, imbalance(self.size(d), self.n)), ("entry", ev, d))
                for d in self.legal_dims(stream)
            ]
        if ev.kind == "boundary":
            return [
                (
                    put(d),
                    (self.switch(ev.info, stream, cur, d), imbalance(self.size(d), self.n)),
                    ("boundary", ev, d, d != cur),
                )
                for d in self.legal_dims(stream)
            ]
        if ev.kind == "exit":
            return [(put(None), (gather_bytes(ev.info, self.n), Fraction(0)), None)]
        if ev.kind == "operand":
            return [(state, (self.gather(ev.info), Fraction(0)), ("operand", ev, cur))]
        return [self.stage(site, state, cur, stream)]

    def stage(self, site: _Site, state: Tuple, cur: str, stream: Stream):
        """The cheapest shard for a stage in ``state`` (the state does not change)."""
        ev = site.ev
        dims = self.legal_dims(stream, exclude=site.compute, within=site.shard_map)
        if not dims:
            raise PlanError(
                f"stage {ev.module!r} computes over {site.compute} of stream {ev.stream!r} "
                f"(sequence dims { {d: self.size(d) for d in stream.seq} }): no other dim can "
                f"be sharded over {self.n} ranks"
                + (f"; its output maps only {sorted(site.shard_map)}" if site.shard_map else "")
                + " (a sharded dim must be at least that long"
                + (", and divisible by it: even_only)" if self.even_only else ")")
            )
        best = None
        for c in dims:
            b = self.switch(ev.info, stream, cur, c) + sum(
                self.gather(o.info) for o in site.operands
            )
            if site.out_stream:
                out = self.streams[site.out_stream]
                target = state[self.order.index(out.name)]
                b += self.switch(site.end.info, out, site.shard_map[c], target)
            else:
                b += self.switch(site.end.info, stream, c, cur)
            step = (b, imbalance(self.size(c), self.n))
            if best is None or step < best[1]:
                best = (state, step, ("stage", site, c, state))
        return best


def _build(rec: Recording, choices: List) -> Plan:
    """The plan of the DP's choices: entry dims, relayouts, stage shards, gathers."""
    order = [s.name for s in rec.streams]
    entry: Dict[str, str] = {}
    stages: List[Stage] = []
    for choice in choices:
        kind, ev = choice[0], choice[1]
        if kind == "entry":
            entry[ev.stream] = choice[2]
        elif kind == "boundary" and choice[3]:
            stages.append(Stage(ev.module, ev.stream, kind="relayout", shard=choice[2]))
        elif kind == "operand":
            stages.append(Stage(ev.module, ev.stream, kind="gather_output", shard=choice[2]))
        elif kind == "stage":
            site, c, state = choice[1], choice[2], choice[3]
            out = site.shard_map[c] if site.out_stream else None
            stages.append(
                Stage(
                    site.ev.module, site.ev.stream, site.compute, c, "compute", site.out_stream, out
                )
            )
            for op in site.operands:
                layout = c if op.stream == site.ev.stream else state[order.index(op.stream)]
                stages.append(Stage(op.module, op.stream, kind="gather_output", shard=layout))
    unique: Dict[Tuple[str, str, str], Stage] = {}
    for st in stages:
        key = (st.kind, st.module, st.stream)
        if unique.setdefault(key, st) != st:
            raise PlanError(
                f"module {st.module!r} runs several times and needs different plans "
                f"({unique[key]} vs {st}); a plan gives one choice per module"
            )
    streams = tuple(
        Stream(s.name, s.dims, s.entry, s.exit, entry[s.name], s.seq, s.arg, s.out)
        for s in rec.streams
    )
    return Plan(streams, tuple(unique.values()))
