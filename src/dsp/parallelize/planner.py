"""The automatic planner: where to shard each stream, and how each stage runs, for the fewest bytes.

Stages (the outermost called modules that compute over some of a stream's sequence dims)
and the shapes at each call come from a recording (:func:`record`). Dynamic programming
over the recorded calls in forward order; the state is the resting dim of every stream:

* at a stream's entry: any legal dim (split: nothing sent, its backward neither);
* at a block boundary: keep the layout, or relayout (one switch of the block input);
* at a stage: ``compute`` on any legal dim it does not compute over (a switch in and back
  unless it is the resting dim), or, for an attention that declares its ``sdpa`` layout,
  ``heads`` (Ulysses) or ``ring``; only where none of these exists (a convolution over
  every sequence dim), ``whole`` (gather, run, keep this rank's part: every rank computes
  the whole module, which bytes do not show); operands used whole are gathered;
* modules with companions or buffers run where the stream rests (``local``);
* at the exit: gather.

Every option is costed by compiling it into the acts the model would run
(:func:`~dsp.parallelize.compile.stage_hooks`) and counting their bytes on the recorded
calls (:func:`~dsp.parallelize.cost.act_costs`): the planner, the dry run and the hooks share
one interpreter. The cost is ``(bytes, imbalance, kind)`` compared lexicographically: exact
bytes of every collective summed over ranks, forward and backward; then how much larger
the largest shard is than an even share; then the simpler kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from dsp.parallelize.chunks import with_chunks
from dsp.parallelize.compile import Act, exit_hook, stage_hooks
from dsp.parallelize.cost import (
    PlanCost,
    act_costs,
    imbalance,
    inner_size,
    legal,
    own_sizes,
    region_calls,
    simulate,
)
from dsp.parallelize.declared import Declarations, read_declarations, stage_modules, stream_of
from dsp.parallelize.plan import Plan, PlanError, Stage, Stream
from dsp.parallelize.timing import Timing, choose_chunks
from dsp.parallelize.trace import Call, Trace, declare_trace, trace_model

__all__ = ["Recording", "plan_model", "record"]

Cost = Tuple[int, Fraction, int]
RANK = {"compute": 0, "local": 0, "heads": 1, "ring": 2, "whole": 3}


@dataclass
class _Site:
    """One decision point at a recorded call."""

    kind: str  # entry | boundary | stage | operand | local | use | exit
    stream: str
    call: Call
    clock: int
    operands: List[Call] = field(default_factory=list)
    module: str = ""


@dataclass
class Recording:
    """A model's streams, declarations, stages and recorded calls: what plans are made from."""

    streams: Tuple[Stream, ...]
    decl: Declarations
    trace: Trace
    stages: Dict[str, Tuple[str, Tuple[str, ...]]]  # module -> (stream, compute dims)
    nested: Dict[str, Tuple[str, ...]] = field(default_factory=dict)  # stage -> inner modules

    def cost(self, plan: Plan, world_size: int, *, even_only: bool = False) -> PlanCost:
        """Dry-run ``plan``: check it and count its bytes (see :func:`simulate`)."""
        return simulate(plan, self.trace, self.decl, world_size, even_only=even_only)

    def plan(
        self,
        world_size: int,
        *,
        even_only: bool = False,
        kinds=None,
        overrides=None,
        price: Optional[Callable[[Act, int, int], float]] = None,
        chunks: Union[int, str, None] = None,
        timing: Optional[Timing] = None,
    ) -> Plan:
        """The plan with the fewest bytes (ties: the most even shards, the simpler kind).

        ``kinds``: the stage kinds the search may use (default: compute, heads, ring, whole).
        ``overrides``: ``{module pattern: kind}`` or ``{pattern: (kind, shard)}``, the user's
        own choice for the stages it matches (``{"blocks.*.attn_temp": ("compute", "S")}``,
        ``{"full": "ring"}``); the planner completes the rest around them.
        ``price(act, forward_bytes, backward_bytes)``: what one collective costs (e.g. its
        time on a described cluster: latency per message, the bandwidth of the link the
        group spans, all-to-all efficiency); default: its bytes. The search minimizes the
        sum; the plan's bytes are still checked against the dry run.
        ``chunks``: run every compute stage that can (its only acts are the switch in and
        back) in that many overlapped slices (``Stage.chunks``; fewer where its dim is too
        short); the bytes change only by the uneven rounding of the slices. ``chunks="auto"``:
        each such stage gets the count its predicted time is least with
        (:func:`~dsp.parallelize.timing.choose_chunks`; 1, blocking, where slicing does not
        pay), which needs ``timing`` (the link's price, seconds per FLOP, how much overlap
        hides: :func:`dsp.sim.plan_price.timing`).
        """
        if chunks == "auto" and timing is None:
            raise PlanError(
                "chunks='auto' chooses each stage's slice count from predicted time: pass "
                "timing= (dsp.sim.plan_price.timing(cluster, world_size) for a described "
                "cluster), or give chunks as a number"
            )
        whole = isinstance(chunks, int) and chunks >= 1
        if chunks is not None and chunks != "auto" and not whole:
            raise PlanError(f"chunks must be a whole number >= 1 or 'auto', got {chunks!r}")
        search = _Search(
            self, world_size, even_only, kinds or ("compute", "heads", "ring", "whole")
        )
        search.overrides = dict(overrides or {})
        search.price = price
        best_cost, choices = search.run(_sites(self))
        plan = search.build(choices)
        check = self.cost(plan, world_size, even_only=even_only).total
        if price is None and check != best_cost[0]:  # planner and dry run agree to the byte
            raise RuntimeError(f"dsp planner: planned {best_cost[0]} bytes, dry run {check}")
        if chunks == "auto":
            plan = choose_chunks(plan, self.trace, self.decl, world_size, timing)[0]
        elif chunks and chunks > 1:
            plan = with_chunks(plan, self.trace, self.decl, world_size, chunks)
        if chunks and chunks != 1:
            self.cost(plan, world_size, even_only=even_only)  # checked like any plan
        return plan


def record(
    model: nn.Module,
    inputs: Any,
    *,
    streams: Optional[Sequence[Stream]] = None,
    compute: Optional[Mapping[str, Any]] = None,
    operands: Optional[Mapping[str, Any]] = None,
    declare: Optional[Mapping[str, Any]] = None,
    itemsize: int = 4,
) -> Recording:
    """Record ``model``: run it on ``inputs`` (example inputs, tiny or on the meta device; a
    tuple, optionally ending in a dict of keyword inputs) or take ``inputs`` as declared dim
    sizes (a mapping ``{"T": 16, ...}``).

    Args:
        streams: the streams; default: the model's ``dsp_streams`` attribute, or
            (the models in ``dsp.models`` carry theirs).
        declare: ``{module name pattern: {"compute": ..., "inputs": ..., ...}}``, the
            declarations of a model without attributes (docs/parallelize.md).
        compute, operands: ``{pattern: dims}`` shorthands.
        itemsize: element size for declared sizes.
    """
    if streams is None:
        streams = getattr(model, "dsp_streams", None)
        if not streams:
            raise PlanError(
                f"{type(model).__name__} declares no streams: pass streams=[Stream(name, dims, "
                "entry, exit, shard, ...)] or give the model a dsp_streams attribute"
            )
    streams = tuple(streams)
    decl = read_declarations(model, streams, compute, operands, declare)
    if isinstance(inputs, Mapping):
        trace = declare_trace(model, streams, inputs, itemsize=itemsize)
    else:
        buffers = {m: list(b) for m, b in decl.buffers.items()}
        trace = trace_model(model, inputs, streams, buffers=buffers, layouts=decl)
    called = {c.module for c in trace.calls}
    stages = stage_modules(model, decl, streams, called)
    nested = {
        outer: tuple(m for m in decl.own_compute if m.startswith(outer + ".") and m in called)
        for outer in stages
        if decl.inner.get(outer)
    }
    return Recording(streams, decl, trace, stages, {k: v for k, v in nested.items() if v})


def plan_model(
    model: nn.Module,
    inputs: Any,
    world_size: int,
    *,
    even_only: bool = False,
    overrides: Optional[Mapping[str, Any]] = None,
    **options,
) -> Plan:
    """The planner's plan for ``model`` on ``world_size`` ranks (options as :func:`record`;
    ``overrides`` as :meth:`Recording.plan`)."""
    rec = record(model, inputs, **options)
    return rec.plan(world_size, even_only=even_only, overrides=overrides)


def _contains(outer: Call, inner: Call) -> bool:
    return outer.start < inner.start and inner.end < outer.end


def _sites(rec: Recording) -> List[_Site]:
    """The recording's decision points in forward order."""
    trace, decl = rec.trace, rec.decl
    streams = {s.name: s for s in rec.streams}
    live: Dict[str, Tuple[int, int]] = {}
    sites: List[_Site] = []
    for s in rec.streams:
        entry, exit_ = region_calls(trace, s)
        end = exit_.start if s.exit_arg is not None else exit_.end
        live[s.name] = (entry.start, end)
        sites.append(_Site("entry", s.name, entry, entry.start - 0.5))
        sites.append(_Site("exit", s.name, exit_, end + 0.5))
    stage_calls: List[_Site] = []
    for c in trace.calls:
        for name, mods in decl.boundaries.items():
            if c.module in mods and live[name][0] < c.start < live[name][1]:
                sites.append(_Site("boundary", name, c, c.start - 0.25))
        if c.module in rec.stages:
            name = rec.stages[c.module][0]
            if live[name][0] <= c.start <= live[name][1]:
                site = _Site("stage", name, c, c.start)
                stage_calls.append(site)
                sites.append(site)
    for c in trace.calls:
        inside = [st for st in stage_calls if _contains(st.call, c)]
        if c.module in decl.operands:
            dims = decl.operands[c.module][1]
            name = stream_of(dims, rec.streams, f"operand {c.module!r}").name
            if not live[name][0] <= c.start <= live[name][1]:
                continue
            if inside:
                inside[-1].operands.append(c)
            else:
                sites.append(_Site("operand", name, c, c.end))
        elif not inside and c.module not in rec.stages:
            for name, s in streams.items():
                _, extra = decl.split_inputs(c.module, s) if c.module in decl.inputs else ({}, {})
                if extra and live[name][0] < c.start <= live[name][1]:
                    sites.append(_Site("local", name, c, c.start))
    for clock, owner, _attr in trace.buffer_uses:
        for name, (lo, hi) in live.items():
            if lo <= clock <= hi:
                sites.append(_Site("use", name, trace.calls[0], clock, module=owner))
    sites.sort(key=lambda s: s.clock)
    return sites


class _Search:
    """Dynamic programming over sites; state: the resting dim of every stream."""

    def __init__(self, rec: Recording, n: int, even_only: bool, kinds):
        self.rec = rec
        self.streams = {s.name: s for s in rec.streams}
        self.order = [s.name for s in rec.streams]
        self.size, self.n, self.even_only = rec.trace.size, n, even_only
        self.kinds = kinds
        self.bare = Plan(rec.streams)
        self.overrides: Dict[str, Any] = {}
        self.price: Optional[Callable[[Act, int, int], float]] = None
        self.locals: set = set()

    def legal_dims(self, stream: Stream, exclude=(), within=None) -> List[str]:
        return [
            d
            for d in stream.seq
            if d not in exclude
            and (within is None or d in within)
            and legal(self.size(d), self.n, self.even_only)
        ]

    def bytes_of(self, st: Stage, call: Call, operands=(), outer: Optional[Tuple] = None):
        """What ``st`` costs at ``call`` with its operands' gathers: forward + backward bytes,
        or the sum of ``price(act, fwd, bwd)`` over its collectives when a price is given.
        ``outer``: ``(stage, call)`` of the stage it is nested in."""
        total = 0
        rest = outer[0].rest if outer else st.rest
        around = [  # the local stages around it: they slice the companions it receives
            Stage(m, st.stream, kind="local", rest=rest)
            for m in self.locals
            if st.module.startswith(m + ".") and m
        ] + ([outer[0]] if outer else [])
        plan = Plan(self.rec.streams, tuple(around)) if around else self.bare
        sizes = None
        if outer:  # the lengths of the enclosing stage's own dims at its call
            sizes = own_sizes(self.rec.decl, outer[0].module, outer[1], self.rec.trace)
        hooks = [(h, call) for h in stage_hooks(0, st, plan, self.rec.decl)]
        for op in operands:
            g = Stage(op.module, _op_stream(self.rec, op), kind="gather_output", shard="_")
            hooks += [(h, op) for h in stage_hooks(0, g, self.bare, self.rec.decl)]
        for hook, at in hooks:
            for act, f, b in act_costs(hook, at, self.rec.trace, self.n, sizes):
                total += f + b if self.price is None else self.price(act, f, b)
        return total

    def nested(self, st: Stage, site: _Site, stream: Stream):
        """``(bytes, stages)`` of the stages nested in ``st`` when it runs on a dim of its own
        that modules inside it need whole (each runs on the stream dim that costs least,
        switching from ``st``'s dim and back); ``None`` if one of them cannot run."""
        inner = self.rec.nested.get(st.module, ())
        if st.kind != "compute" or st.shard not in self.rec.decl.inner.get(st.module, ()):
            return 0, []
        total, out = 0, []
        calls = [c for c in self.rec.trace.calls if c.module in inner and _contains(site.call, c)]
        for module in dict.fromkeys(c.module for c in calls):
            mine = self.rec.decl.own_compute[module]
            if st.shard not in mine:
                continue
            best = None
            exclude = self.rec.decl.compute.get(module, ())
            for d in self.legal_dims(stream, exclude=exclude):
                cand = Stage(module, stream.name, mine + exclude, d, "compute", rest=st.shard)
                b = sum(
                    self.bytes_of(cand, c, outer=(st, site.call))
                    for c in calls
                    if c.module == module
                )
                if best is None or b < best[0]:
                    best = (b, cand)
            if best is None:
                return None
            total += best[0]
            out.append(best[1])
        return total, out

    def run(self, sites: List[_Site]) -> Tuple[Cost, List]:
        self.locals = {s.module or s.call.module for s in sites if s.kind == "local"}
        start = (None,) * len(self.order)
        best: Dict[Tuple, Tuple[Cost, List]] = {start: ((0, Fraction(0), 0), [])}
        for site in sites:
            new: Dict[Tuple, Tuple[Cost, List]] = {}
            for state, (cost, choices) in best.items():
                for nxt, step, choice in self.options(site, state):
                    total = tuple(a + b for a, b in zip(cost, step))
                    if nxt not in new or total < new[nxt][0]:
                        new[nxt] = (total, choices + ([choice] if choice else []))
            if not new:
                stream = self.streams[site.stream]
                raise PlanError(
                    f"no legal dim to shard stream {stream.name!r} at its entry "
                    f"{stream.entry!r}: sequence dims "
                    f"{ {d: self.size(d) for d in stream.seq} }, world size {self.n}"
                    + (", even_only" if self.even_only else "")
                )
            best = new
        return min(best.values(), key=lambda v: v[0])

    def options(self, site: _Site, state: Tuple):
        """``(next state, (bytes, imbalance, kind), choice)`` for each legal choice."""
        stream = self.streams[site.stream]
        k = self.order.index(site.stream)
        cur = state[k]

        def put(d):
            return state[:k] + (d,) + state[k + 1 :]

        zero = (0, Fraction(0), 0)
        if site.kind == "entry":
            return [
                (put(d), (0, imbalance(self.size(d), self.n), 0), ("entry", site, d))
                for d in self.legal_dims(stream)
            ]
        if site.kind == "boundary":
            out = []
            for d in self.legal_dims(stream):
                st = Stage(site.call.module, stream.name, kind="relayout", shard=d, rest=cur)
                b = self.bytes_of(st, site.call) if d != cur else 0
                out.append(
                    (put(d), (b, imbalance(self.size(d), self.n), 0), ("boundary", site, d, cur))
                )
            return out
        if site.kind == "exit":
            hook = exit_hook(stream, cur)
            total = sum(
                f + b if self.price is None else self.price(act, f, b)
                for act, f, b in act_costs(hook, site.call, self.rec.trace, self.n)
            )
            return [(put(None), (total, Fraction(0), 0), None)]
        if site.kind == "operand":
            st = Stage(site.call.module, stream.name, kind="gather_output", shard=cur)
            return [(state, (self.bytes_of(st, site.call), Fraction(0), 0), ("stage", st))]
        if site.kind in ("local", "use"):
            module = site.module or site.call.module
            return [(state, zero, ("stage", Stage(module, stream.name, kind="local", rest=cur)))]
        return self.stage(site, state, cur, stream)

    def stage(self, site: _Site, state: Tuple, cur: str, stream: Stream):
        """Every way to run a stage in ``state`` (the state does not change)."""
        module = site.call.module
        compute = self.rec.stages[module][1]
        smap = self.rec.decl.shard_maps.get(module)
        out_stream = (
            stream_of(tuple(smap.values()), self.rec.streams, f"{module!r} shard_map").name
            if smap
            else None
        )
        cands: List[Stage] = []
        own = [  # the module's own shard dims ('shard'), long enough at this call
            d
            for d in ([] if smap else self.rec.decl.inner.get(module, ()))
            if legal(self.own_size(module, d, site.call), self.n, self.even_only)
        ]
        if "compute" in self.kinds:
            for c in self.legal_dims(stream, exclude=compute, within=smap) + own:
                if out_stream:
                    o = state[self.order.index(out_stream)]
                    cands.append(
                        Stage(
                            module,
                            stream.name,
                            compute,
                            c,
                            "compute",
                            out_stream,
                            smap[c],
                            rest=cur,
                            out_rest=o,
                        )
                    )
                else:
                    cands.append(Stage(module, stream.name, compute, c, rest=cur))
        if module in self.rec.decl.sdpa and cur in compute and not out_stream:
            heads = self._heads(site.call)
            if "heads" in self.kinds and heads is not None and heads >= self.n:
                cands.append(Stage(module, stream.name, compute, "H", "heads", rest=cur))
            if "ring" in self.kinds and self.rec.trace.inside(site.call):
                cands.append(Stage(module, stream.name, compute, cur, "ring", rest=cur))
        whole = Stage(module, stream.name, compute, None, "whole", rest=cur)
        if "whole" in self.kinds and not out_stream and not cands:  # N x the compute: last resort
            cands.append(whole)
        cands = self.chosen(module, cands, [] if out_stream or whole in cands else [whole])
        if not cands:
            raise PlanError(
                f"stage {module!r} computes over {compute} of stream {stream.name!r} "
                f"(sequence dims { {d: self.size(d) for d in stream.seq} }): no other dim can "
                f"be sharded over {self.n} ranks"
                + (f"; its output maps only {sorted(smap)}" if smap else "")
                + " (a sharded dim must be at least that long"
                + (", and divisible by it: even_only)" if self.even_only else ")")
            )
        out = []
        for st in cands:
            inner = self.nested(st, site, stream)
            if inner is None:
                continue
            b = self.bytes_of(st, site.call, _gathered(st, site.operands, self.rec)) + inner[0]
            length = (
                self.own_size(module, st.shard, site.call)
                if st.shard in own
                else self.size(st.shard)
                if st.kind == "compute"
                else None
            )
            imb = imbalance(length, self.n) if length is not None else Fraction(0)
            out.append((state, (b, imb, RANK[st.kind]), ("stage", st, site, state, inner[1])))
        return out

    def own_size(self, module: str, dim: str, call: Call) -> int:
        """Length of a module's own shard dim at ``call`` (0 if unknown)."""
        return inner_size(self.rec.decl, module, dim, call, self.rec.trace) or 0

    def chosen(self, module: str, cands: List[Stage], extra: List[Stage]) -> List[Stage]:
        """The candidates the user's override for ``module`` allows (``extra``: options only
        an override selects, such as ``whole`` where something cheaper exists)."""
        from dsp.parallelize.declared import matches

        for pattern, want in self.overrides.items():
            if not matches(module, pattern):
                continue
            kind, shard = (want, None) if isinstance(want, str) else tuple(want)
            keep = [st for st in cands + extra if st.kind == kind and shard in (None, st.shard)]
            if not keep:
                options = [(st.kind, st.shard) for st in cands + extra]
                raise PlanError(
                    f"override {pattern!r} -> {want!r}: stage {module!r} cannot run that way "
                    f"here (its options: {options})"
                )
            return keep
        return cands

    def _heads(self, call: Call) -> Optional[int]:
        lay = self.rec.decl.sdpa[call.module]
        att = self.rec.trace.inside(call)
        if not att or "H" not in lay.names:
            return None
        sizes = dict(self.rec.trace.sizes)
        lay.bind(att[0].q.shape, sizes)
        return sizes["H"]

    def build(self, choices: List) -> Plan:
        """The plan of the DP's choices."""
        entry: Dict[str, str] = {}
        stages: List[Stage] = []
        for choice in choices:
            kind = choice[0]
            if kind == "entry":
                entry[choice[1].stream] = choice[2]
            elif kind == "boundary":
                site, d, cur = choice[1], choice[2], choice[3]
                if d != cur:
                    stages.append(
                        Stage(site.call.module, site.stream, kind="relayout", shard=d, rest=cur)
                    )
            else:
                st = choice[1]
                stages.append(st)
                stages += choice[4] if len(choice) > 4 else []  # stages nested in it
                if len(choice) > 2:
                    for op in _gathered(st, choice[2].operands, self.rec):
                        shard = _operand_shard(st, op, self.rec, self.order, choice[3])
                        stages.append(
                            Stage(
                                op.module,
                                _op_stream(self.rec, op),
                                kind="gather_output",
                                shard=shard,
                            )
                        )
        unique: Dict[Tuple[str, str, str], Stage] = {}
        for st in stages:
            key = (
                st.kind if st.kind in ("relayout", "gather_output") else "run",
                st.module,
                st.stream,
            )
            if unique.setdefault(key, st) != st:
                raise PlanError(
                    f"module {st.module!r} runs several times and needs different plans "
                    f"({unique[key]} vs {st}); a plan gives one choice per module"
                )
        streams = tuple(
            Stream(
                s.name,
                s.dims,
                s.entry,
                s.exit,
                entry[s.name],
                s.seq,
                s.arg,
                s.out,
                s.layout,
                s.exit_arg,
            )
            for s in self.rec.streams
        )
        kept = [st for st in unique.values() if not _idle(st, self.rec.decl, streams)]
        return Plan(streams, tuple(kept))


def _idle(st: Stage, decl: Declarations, streams) -> bool:
    """A local stage with nothing to slice (no companion or buffer holds its dim)."""
    if st.kind != "local":
        return False
    s = next(x for x in streams if x.name == st.stream)
    _, extra = decl.split_inputs(st.module, s) if st.module in decl.inputs else ({}, {})
    lays = list(extra.values()) + list((decl.buffers.get(st.module) or {}).values())
    return not any(st.rest in lay.names for lay in lays)


def _gathered(st: Stage, operands, rec: Recording) -> list:
    """The operands a stage must gather (inside ``whole``, its own stream is whole)."""
    if st.kind != "whole":
        return list(operands)
    return [op for op in operands if _op_stream(rec, op) != st.stream]


def _op_stream(rec: Recording, op: Call) -> str:
    dims = rec.decl.operands[op.module][1]
    return stream_of(dims, rec.streams, f"operand {op.module!r}").name


def _operand_shard(st: Stage, op: Call, rec: Recording, order, state) -> Optional[str]:
    """The dim an operand's stream is sharded on inside stage ``st``."""
    name = _op_stream(rec, op)
    if name == st.stream:
        return st.shard if st.kind == "compute" else st.rest
    return state[order.index(name)]
