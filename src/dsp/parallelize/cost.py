"""The dry run: walk a trace through a plan's compiled hooks; check it and count its bytes.

:func:`simulate` runs no collective and needs no process group. It takes the hooks
:func:`~dsp.parallelize.compile.compile_plan` produced (the very acts the model will run),
costs every act at every recorded call with :func:`~dsp.parallelize.compile.act_bytes`,
binds every declared layout to the recorded shapes (a fold that does not divide, a
companion whose rows do not match its stream), and follows each stream's resting dim to
raise :class:`PlanError` where the plan would compute wrongly: a module that needs a dim
whole runs while it is sharded, an operand used whole is not gathered, a shard is illegal
for the world size, a stage's ``rest`` is not where the stream rests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from dsp.layout import LayoutError
from dsp.parallelize.chunks import chunked_bytes
from dsp.parallelize.compile import Act, Hook, act_bytes, compile_plan, encloses
from dsp.parallelize.declared import Declarations
from dsp.parallelize.norms import norm_bytes
from dsp.parallelize.plan import RUNS, Plan, PlanError, Stage
from dsp.parallelize.trace import Call, TensorInfo, Trace

__all__ = ["PlanCost", "act_costs", "hook_bytes", "imbalance", "legal", "resolve_rests", "simulate"]


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


def legal(length: int, n: int, even_only: bool = False) -> bool:
    """May a dim of ``length`` be sharded over ``n`` ranks? (No empty shards; even if asked.)"""
    return length >= n and (not even_only or length % n == 0)


def imbalance(length: int, n: int):
    """Extra work of the largest shard over an even share, relative to the whole dim."""
    from fractions import Fraction

    from dsp.comm.shards import shard_sizes

    return Fraction(max(shard_sizes(length, n)) * n - length, max(length, 1))


def _tensor(act: Act, side: str, call: Call, trace: Trace, sizes: Dict[str, int]):
    """The recorded full tensor an act sees at ``call`` (or the declared full shape)."""
    info = call.input(act.key) if side == "pre" else call.output(act.key)
    if info is None and trace.declared:
        try:
            return TensorInfo(act.layout.full_shape(sizes), trace.grad, trace.itemsize)
        except KeyError:
            return None
    return info


def hook_bytes(
    hook: Hook, call: Call, trace: Trace, n: int, sizes: Optional[Dict[str, int]] = None
) -> Tuple[int, int]:
    """``(forward, backward)`` bytes of ``hook``'s acts at ``call``; binds their layouts."""
    fwd = bwd = 0
    for _act, f, b in act_costs(hook, call, trace, n, sizes):
        fwd, bwd = fwd + f, bwd + b
    return fwd, bwd


def act_costs(hook: Hook, call: Call, trace: Trace, n: int, sizes: Optional[Dict[str, int]] = None):
    """``(act, forward bytes, backward bytes)`` for each collective ``hook`` issues at
    ``call`` (an attention act once per attention call inside it)."""
    sizes = dict(trace.sizes) if sizes is None else sizes
    for act in hook.acts:
        if act.op == "buffers":
            continue
        if act.op == "chunked":
            x, out = call.input(act.key), call.output(None)
            if x is None or out is None:
                raise PlanError(f"{call.module!r}: a chunked stage needs its input and output")
            local = dict(sizes)
            _bind(act, x, local, f"{call.module!r} input {act.key!r}")
            try:
                act.out.bind(out.shape, local, what=f"{call.module!r} output")
            except LayoutError as e:
                raise PlanError(str(e)) from None
            yield (act, *chunked_bytes(act, x, out, local, n))
            continue
        if act.op == "norm":
            if trace.declared:
                raise PlanError(f"{act.label}: sharded norms need a recorded trace")
            if hook.side == "pre":
                for m in trace.norms_inside(call):
                    yield (act, *norm_bytes(m.x.shape, m.groups, m.x.itemsize, m.x.grad, n))
            continue
        if act.op == "attend":
            attends = trace.inside(call)
            if trace.declared:
                raise PlanError(
                    f"{act.label}: a {act.kind} stage needs a recorded trace (example inputs), "
                    "not declared sizes"
                )
            if hook.side == "post":
                continue
            for a in attends:
                local = dict(sizes)
                _bind(act, a.q, local, f"{call.module!r} attention q")
                yield (act, *act_bytes(act, a.q, local, n))
            continue
        info = _tensor(act, hook.side, call, trace, sizes)
        if info is None and (act.op == "split" or act.kind == "companion"):  # not passed here
            continue
        if info is None:
            where = "input" if hook.side == "pre" else "output"
            raise PlanError(
                f"{call.module!r}: {where} {act.key!r} (layout {act.layout}) is not a tensor "
                "in the recorded call"
            )
        local = dict(sizes)  # what an act learns (a companion's D) stays with it
        where = "input" if hook.side == "pre" else "output"
        _bind(act, info, local, f"{call.module!r} {where} {act.key!r}")
        yield (act, *act_bytes(act, info, local, n))


def _bind(act: Act, info: TensorInfo, sizes: Dict[str, int], what: str) -> None:
    try:
        act.layout.bind(info.shape, sizes, what=what)
    except LayoutError as e:
        raise PlanError(str(e)) from None


def _check_shard(dim: Optional[str], stream, trace: Trace, n: int, even_only: bool, what) -> None:
    if dim is None:
        return
    if dim not in stream.seq:
        raise PlanError(
            f"{what}: shard {dim!r} is not a sequence dim of stream {stream.name!r} {stream.seq}"
        )
    length = trace.size(dim)
    if not legal(length, n, even_only):
        why = "is not divisible by" if length >= n else "is shorter than"
        raise PlanError(
            f"{what}: dim {dim!r} of length {length} {why} the world size {n}"
            + (" (even_only)" if length >= n else " (some ranks would hold empty shards)")
        )


def own_sizes(decl: Declarations, module: str, call: Call, trace: Trace) -> Dict[str, int]:
    """The lengths of the dims of ``module``'s declared inputs at ``call`` (its own dims, such
    as a UNet block's rows, whose length changes from call to call), with the trace's."""
    sizes: Dict[str, int] = dict(trace.sizes)
    for key, lay in (decl.inputs.get(module) or {}).items():
        info = call.input(key)
        if info is None:
            continue
        local = dict(sizes)
        try:
            lay.bind(info.shape, local, what=f"{module!r} input {key!r}")
        except LayoutError:
            continue
        sizes.update(local)
    return sizes


def inner_size(
    decl: Declarations, module: str, dim: str, call: Call, trace: Trace
) -> Optional[int]:
    """The length of a module's own shard dim (its ``shard`` declaration) at ``call``, from
    the recorded input whose declared layout has it (None if that input was not recorded)."""
    return own_sizes(decl, module, call, trace).get(dim)


def region_calls(trace: Trace, s) -> Tuple[Call, Call]:
    """The calls where stream ``s`` is split (its entry) and gathered (its exit after it)."""
    entry = next((c for c in trace.calls if c.module == s.entry), None)
    exit_ = next(
        (c for c in trace.calls if c.module == s.exit and entry and c.start > entry.start), None
    )
    if entry is None or exit_ is None:
        missing = s.entry if entry is None else s.exit
        raise PlanError(f"stream {s.name!r}: module {missing!r} never ran (after its entry)")
    return entry, exit_


def _live(trace: Trace) -> Dict[str, Tuple[int, int]]:
    """Each stream's sharded region: from its entry's call to its gather."""
    live = {}
    for s in trace.streams:
        entry, exit_ = region_calls(trace, s)
        live[s.name] = (entry.start, exit_.start if s.exit_arg is not None else exit_.end)
    return live


def resolve_rests(plan: Plan, trace: Trace) -> Plan:
    """``plan`` with every missing ``rest`` / ``out_rest`` filled from the order of ``trace``
    (where each stream rests when the stage's module first runs in its region)."""
    import dataclasses

    if all(
        (st.rest is not None or st.kind not in RUNS + ("relayout",))
        and (st.out_rest is not None or st.out_stream is None)
        and (st.shard is not None or st.kind != "gather_output")
        for st in plan.stages
    ):
        return plan
    live = _live(trace)
    rest: Dict[str, Optional[str]] = {s.name: None for s in plan.streams}
    found: Dict[int, Stage] = {}
    for call in sorted(trace.calls, key=lambda c: c.start):
        for s in plan.streams:
            if call.module == s.entry and call.start == live[s.name][0]:
                rest[s.name] = s.shard
        for i, st in enumerate(plan.stages):
            if st.module != call.module or not _inside(call.start, live[st.stream]):
                continue
            if st.kind == "relayout":
                if st.rest is None and i not in found:
                    found[i] = dataclasses.replace(st, rest=rest[st.stream])
                rest[st.stream] = st.shard
            elif st.kind == "gather_output" and st.shard is None and i not in found:
                found[i] = dataclasses.replace(st, shard=_enclosing(st, plan, rest))
            elif i not in found:
                fill = {}
                if st.rest is None and st.kind in RUNS:
                    fill["rest"] = rest[st.stream]
                if st.out_stream and st.out_rest is None:
                    fill["out_rest"] = rest[st.out_stream]
                found[i] = dataclasses.replace(st, **fill) if fill else st
    stages = tuple(found.get(i, st) for i, st in enumerate(plan.stages))
    return Plan(plan.streams, stages, plan.params)


def _enclosing(st: Stage, plan: Plan, rest) -> Optional[str]:
    """Where an operand's stream is sharded: the enclosing compute stage's dim, or its rest."""
    for outer in plan.stages:
        inside = st.module.startswith(outer.module + ".") or not outer.module
        if inside and outer.kind == "compute" and outer.stream == st.stream:
            return outer.shard
    return rest[st.stream]


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
    for s in plan.streams:
        _check_shard(s.shard, s, trace, n, even_only, f"stream {s.name!r}")
    plan = resolve_rests(plan, trace)
    hooks = compile_plan(plan, decl)
    by_module: Dict[str, List[Hook]] = {}
    for h in hooks:
        by_module.setdefault(h.module, []).append(h)
    stages: Dict[str, List[Tuple[int, Stage]]] = {}
    for i, st in enumerate(plan.stages):
        stages.setdefault(st.module, []).append((i, st))
        stream = streams[st.stream]
        what = f"stage {i} ({st.kind} {st.module})"
        own = st.kind == "compute" and st.shard in decl.inner.get(st.module, ())
        if st.kind in ("compute", "relayout") and not own:
            _check_shard(st.shard, stream, trace, n, even_only, what)
        if st.out_stream:
            _check_shard(st.out_shard, streams[st.out_stream], trace, n, even_only, what)
    live = _live(trace)
    sizes = dict(trace.sizes)
    cost = PlanCost(n)
    rest: Dict[str, Optional[str]] = {s: None for s in streams}
    active: List[Tuple[Call, Stage]] = []  # open stage calls (what each module runs on)
    ran = set()
    events = sorted(
        [(c.start, 0, c) for c in trace.calls]
        + [(c.end, 1, c) for c in trace.calls]
        + [(clock, 2, (owner, attr)) for clock, owner, attr in trace.buffer_uses],
        key=lambda e: (e[0], e[1]),
    )
    for _clock, post, call in events:
        if post == 2:
            _check_buffer_use(call, plan, decl, rest, live, _clock)
            continue
        if not post:
            for s in plan.streams:
                if call.module == s.entry and call.start == live[s.name][0]:
                    rest[s.name] = s.shard
        seeded = dict(sizes)  # the own dims of the stages this call runs inside
        for c, st in active:
            if decl.inner.get(st.module) and c is not call:
                seeded.update(own_sizes(decl, st.module, c, trace))
        for hook in by_module.get(call.module, ()):
            if (hook.side == "post") != bool(post):
                continue
            _in_region(hook, call, plan, live)
            f, b = hook_bytes(hook, call, trace, n, seeded)
            cost.add(hook.acts[0].label, f, b)
        if not post:
            for i, st in stages.get(call.module, ()):
                if encloses(st.module, streams[st.stream]):
                    ran.add(i)  # buffers only: checked where they are read (below)
                    continue
                if not _inside(call.start, live[st.stream]):
                    continue
                ran.add(i)
                if st.kind == "relayout":
                    if st.rest is not None and st.rest != rest[st.stream]:
                        raise _rest_error(i, st, rest[st.stream])
                    rest[st.stream] = st.shard
                elif st.kind != "gather_output":
                    here = _effective(st.stream, rest, active)  # inside an enclosing stage
                    here = rest[st.stream] if here == "attention" else here
                    if st.rest != here:
                        raise _rest_error(i, st, here)
                    if st.kind == "compute" and st.shard in decl.inner.get(st.module, ()):
                        _check_inner(i, st, decl, call, trace, n, even_only)
                    active.append((call, st))
            _check_call(call, decl, plan, stages, rest, active, live, trace)
        else:
            active[:] = [(c, st) for c, st in active if c is not call]
            for s in plan.streams:
                if call.module == s.exit and call.end == live[s.name][1]:
                    rest[s.name] = None
            if call.module in decl.operands:
                _check_operand(call, decl, stages, rest, active, plan, live)
    never = [f"{i} ({st.module})" for i, st in enumerate(plan.stages) if i not in ran]
    if never:
        raise PlanError(
            f"stages {never} never act: their modules do not run inside the sharded region "
            "(or a relayout is not at a block boundary of its stream)"
        )
    return cost


def _check_inner(i: int, st: Stage, decl: Declarations, call: Call, trace, n, even_only) -> None:
    length = inner_size(decl, st.module, st.shard, call, trace)
    if length is not None and not legal(length, n, even_only):
        raise PlanError(
            f"stage {i} (compute {st.module!r}): its own dim {st.shard!r} has length {length} "
            f"at this call, too short to shard over {n} ranks"
            + (" evenly" if even_only and length >= n else "")
        )
    norms = trace.norms_inside(call)
    if norms and st.module not in decl.norms:  # they may reduce over the dim it runs on
        raise PlanError(
            f"stage {i} (compute {st.module!r}) runs sharded on its own dim {st.shard!r}, and "
            f"{len(norms)} group_norm call(s) run inside it: declare their input layout "
            f"('norm', e.g. 'B C F H W') so their statistics are summed over the ranks"
        )


def _inside(clock: int, span: Tuple[int, int]) -> bool:
    return span[0] <= clock <= span[1]


def _in_region(hook: Hook, call: Call, plan: Plan, live) -> bool:
    """Hooks act at every call of their module (as at run time): a stage's module that also
    runs outside its stream's sharded region would act on a whole tensor, so it is an error
    (buffers a parent slices around the region are the exception)."""
    label = hook.acts[0].label if hook.acts else ""
    if label.startswith("stage ") and any(a.op != "buffers" for a in hook.acts):
        i = int(label.split()[1])
        st = plan.stages[i]
        if not _inside(call.start, live[st.stream]):
            raise PlanError(
                f"stage {i} ({st.kind} {st.module!r}) also runs outside the sharded region of "
                f"stream {st.stream!r} (before its entry or after its exit); its hooks would "
                "act on a whole tensor there"
            )
    return True


def _check_buffer_use(use, plan: Plan, decl: Declarations, rest, live, clock: int) -> None:
    """A declared buffer read while a stream is sharded on one of its dims must be sliced
    there, by a ``local`` stage on its owner that rests where the stream rests."""
    owner, attr = use
    lay = (decl.buffers.get(owner) or {}).get(attr)
    for s in plan.streams:
        cur = rest[s.name]
        if lay is None or cur is None or cur not in lay.names or not _inside(clock, live[s.name]):
            continue
        local = [st for st in plan.stages if st.module == owner and st.kind == "local"]
        if not local or local[0].rest != cur:
            have = local[0].rest if local else None
            raise PlanError(
                f"{owner or '<root>'}.{attr} ({lay}) is read while stream {s.name!r} rests on "
                f"{cur!r}, but the plan slices it on {have!r}: add Stage({owner!r}, "
                f"{s.name!r}, kind='local', rest={cur!r})"
            )


def _rest_error(i: int, st: Stage, actual: Optional[str]) -> PlanError:
    return PlanError(
        f"stage {i} ({st.kind} {st.module!r}) says stream {st.stream!r} rests on {st.rest!r} "
        f"when it runs, but it rests on {actual!r} there"
    )


def _effective(stream: str, rest, active) -> Optional[str]:
    """The dim ``stream`` is sharded on inside the innermost open stage (None: whole)."""
    for _, st in reversed(active):
        if st.stream != stream:
            continue
        if st.kind == "compute":
            return st.shard
        if st.kind in ("whole", "tp"):
            return None
        if st.kind in ("heads", "ring", "usp"):
            return "attention"
        return rest[stream]
    return rest[stream]


def _check_call(call: Call, decl: Declarations, plan: Plan, stages, rest, active, live, trace):
    mine = decl.own_compute.get(call.module, ())
    if mine:  # needs an enclosing stage's own dims whole: not while that stage runs on them
        for s in plan.streams:
            cur = _effective(s.name, rest, active)
            if cur in mine and _inside(call.start, live[s.name]):
                raise PlanError(
                    f"module {call.module!r} computes over {mine}, but the plan leaves stream "
                    f"{s.name!r} sharded on {cur!r} when it runs; add a stage for it that "
                    "shards another dim"
                )
    own = decl.compute.get(call.module)
    if not own:
        return
    for s in plan.streams:
        if not set(own) <= set(s.seq) or not _inside(call.start, live[s.name]):
            continue
        cur = _effective(s.name, rest, active)
        if any(
            st.kind in ("heads", "ring", "usp") and st.module == call.module
            for _, st in stages.get(call.module, ())
        ):
            continue
        if cur in own:
            raise PlanError(
                f"module {call.module!r} computes over {own}, but the plan leaves stream "
                f"{s.name!r} sharded on {cur!r} when it runs; add a stage for it (or for a "
                "module containing it) that shards another dim"
            )


def _check_operand(call: Call, decl, stages, rest, active, plan: Plan, live) -> None:
    user, dims = decl.operands[call.module]
    gathers = [(i, st) for i, st in stages.get(call.module, ()) if st.kind == "gather_output"]
    for s in plan.streams:
        if not set(dims) <= set(s.seq) or not _inside(call.start, live[s.name]):
            continue
        cur = _effective(s.name, rest, active)
        if cur is None:  # inside a whole/tp stage: the stream is whole there
            continue
        if not gathers:
            raise PlanError(
                f"{user!r} uses the output of {call.module!r} whole (full_operands), but the "
                "plan has no gather_output stage for it"
            )
        i, st = gathers[0]
        if st.shard is not None and st.shard != cur:
            raise PlanError(
                f"stage {i} gathers {call.module!r} along {st.shard!r}, but stream "
                f"{s.name!r} is sharded on {cur!r} there"
            )
