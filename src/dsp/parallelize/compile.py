"""The one interpreter: a plan compiles, once, into fixed actions per module hook.

:func:`compile_plan` turns a :class:`~dsp.parallelize.plan.Plan` and the model's
declarations into a list of :class:`Hook` s, each a module, a side (``pre``: its inputs;
``post``: its output) and the :class:`Act` s to run there. An act names the argument it
acts on, that tensor's :class:`~dsp.layout.Layout`, and the sharded dim before (``src``) and
after (``dst``). Nothing depends on what ran before: a module re-run by activation
checkpointing runs the same acts. The same acts are executed by :mod:`.apply`, costed by
:func:`act_bytes` in the dry run (:mod:`.cost`) and in the planner's search.

=============  =====================================  ==============================
op             forward                                backward
=============  =====================================  ==============================
split          whole -> this rank's shard of ``dst``  zero-padded, no communication
switch         sharded ``src`` -> sharded ``dst``     the reverse switch
gather         sharded ``src`` -> whole (exit)        this rank's slice, times N
allgather      sharded ``src`` -> whole (operand)     reduce-scatter (sum)
reducescatter  partial sums -> shard of ``dst``       all-gather
attend         attentions inside run as ``heads`` / ``ring`` / ``usp`` over ``src``
chunked        ``degree`` slices of ``dst``: each switched ``src -> dst``, computed and
               switched back, the transfers overlapping the other slices' compute
norm           group norms inside, sharded on ``src``: statistics summed over ranks
buffers        attributes sliced to ``dst`` while the module runs (restored after)
bind           learn dim sizes from a whole input (no data moves)
=============  =====================================  ==============================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from dsp.comm.shards import shard_sizes
from dsp.layout import Layout
from dsp.parallelize.declared import Declarations
from dsp.parallelize.plan import Arg, Plan, PlanError, Stage, Stream
from dsp.parallelize.trace import TensorInfo

__all__ = ["Act", "Hook", "act_bytes", "compile_plan", "exit_hook", "stage_hooks"]


@dataclass(frozen=True)
class Act:
    """One action on one argument (``pre``) or output element (``post``) of a module."""

    op: str
    key: Optional[Arg]
    layout: Layout
    src: Optional[str] = None
    dst: Optional[str] = None
    label: str = ""
    kind: str = ""  # attend: heads | ring | usp; allgather: "companion" (may be absent)
    degree: Optional[int] = None  # attend usp: the Ulysses degree
    bias: Optional[str] = None  # reducescatter: the row-parallel Linear whose bias follows
    out: Optional[Layout] = None  # chunked: the output's layout (switched back per chunk)
    parts: Tuple[Tuple[Arg, Layout], ...] = ()  # chunked: companions sliced per chunk


@dataclass(frozen=True)
class Hook:
    """The acts of one module on one side, in order."""

    module: str
    side: str  # "pre" | "post"
    acts: Tuple[Act, ...]


def _entry(s: Stream) -> List[Hook]:
    lay = s.entry_layout
    hooks = [Hook(s.entry, "pre", (Act("split", s.arg, lay, None, s.shard, f"split {s.name}"),))]
    return hooks


def exit_hook(s: Stream, rest: str) -> Hook:
    """The gather at the exit of ``s``, which rests on ``rest`` there.

    The exit tensor keeps the sequence dims; its other dims may differ from the entry's (a
    head maps C channels to patches), so they get names of their own (``C_out``).
    """
    lay = _own_dims(s, "out")
    if s.exit_arg is not None:
        return Hook(
            s.exit, "pre", (Act("gather", s.exit_arg, lay, rest, None, f"gather {s.name}"),)
        )
    return Hook(s.exit, "post", (Act("gather", s.out, lay, rest, None, f"gather {s.name}"),))


def stage_hooks(i: int, st: Stage, plan: Plan, decl: Declarations) -> List[Hook]:
    """The hooks of stage ``i`` (see :data:`~dsp.parallelize.plan.KINDS`)."""
    s = plan.stream(st.stream)
    label = f"stage {i}"
    if st.kind == "gather_output":
        # an operand's output keeps the stream's sequence dims; its other dims are its own
        outs = decl.outputs.get(st.module) or {None: _own_dims(s, "op")}
        return [
            Hook(
                st.module,
                "post",
                tuple(Act("allgather", k, lay, st.shard, None, label) for k, lay in outs.items()),
            )
        ]
    main, extra = decl.split_inputs(st.module, s)
    if st.kind == "relayout":
        if st.rest == st.shard:
            return []
        arg = {s.arg: decl.input_layouts(st.module, s).get(s.arg, s.entry_layout)}
        return [
            Hook(
                st.module,
                "pre",
                tuple(Act("switch", k, lay, st.rest, st.shard, label) for k, lay in arg.items()),
            )
        ]
    r = st.rest
    if r is None:
        raise PlanError(
            f"{label} ({st.module!r}): its stream {s.name!r} has relayouts, so the stage must "
            "say where the stream rests when it runs (rest=...)"
        )
    runs_on = {"compute": st.shard, "local": r, "heads": r, "ring": r, "usp": r}.get(st.kind)
    pre: List[Act] = []
    post: List[Act] = []
    if encloses(st.module, s):  # the model itself (or a parent of the entry): buffers only
        main, extra = {}, {}
    for k, lay in main.items():
        if st.kind == "compute" and st.shard != r:
            pre.append(Act("switch", k, lay, r, st.shard, label))
        elif st.kind in ("whole", "tp"):
            pre.append(Act("allgather", k, lay, r, None, label))
    passed = _sliced_by(st, plan, decl)  # companions the enclosing stage sliced, by name
    for k, lay in extra.items():
        sliced = passed.get(k)
        if sliced in lay.names and sliced != runs_on:  # the parent's slice: made whole first
            pre.append(Act("allgather", k, lay, sliced, None, label, kind="companion"))
        if runs_on is not None and runs_on in lay.names and runs_on != sliced:
            pre.append(Act("split", k, lay, None, runs_on, label))
    for attr, lay in (decl.buffers.get(st.module) or {}).items():
        if runs_on is not None and runs_on in lay.names:
            pre.append(Act("buffers", attr, lay, None, runs_on, label))
            post.append(Act("buffers", attr, lay, runs_on, None, label))
    if st.kind in ("heads", "ring", "usp"):
        sdpa = decl.sdpa.get(st.module)
        if sdpa is None:
            raise PlanError(
                f"{label} ({st.kind} {st.module!r}): the module declares no 'sdpa' layout "
                "(the layout of q, k, v in its scaled_dot_product_attention calls)"
            )
        if r not in sdpa.names:
            raise PlanError(
                f"{label}: the stream rests on {r!r}, which its sdpa layout {sdpa} lacks"
            )
        act = Act(
            "attend", None, sdpa, r, "H" if st.kind != "ring" else r, label, st.kind, st.degree
        )
        pre.append(act)
        post.insert(0, act)
    norm = decl.norms.get(st.module)
    if norm is not None and runs_on in norm.names and runs_on not in norm.groups[0]:
        act = Act("norm", None, norm, runs_on, None, label)
        pre.append(act)
        post.insert(0, act)
    outs = decl.output_layouts(st.module, s)
    if st.out_stream is not None:
        target = plan.stream(st.out_stream)
        if st.out_rest is None:
            raise PlanError(
                f"{label} ({st.module!r}): give out_rest (stream {target.name!r} relayouts)"
            )
        for k, lay in (decl.outputs.get(st.module) or {None: target.entry_layout}).items():
            if st.out_shard != st.out_rest:
                post.append(Act("switch", k, lay, st.out_shard, st.out_rest, label))
    else:
        for k, lay in outs.items():
            if st.kind == "compute" and st.shard != r:
                post.append(Act("switch", k, lay, st.shard, r, label))
            elif st.kind == "whole":
                post.append(Act("split", k, lay, None, r, label))
            elif st.kind == "tp":
                post.append(Act("reducescatter", k, lay, None, r, label, bias=_row_of(st, plan)))
    if st.chunks and st.chunks > 1:
        pre, post = _chunked(st, label, pre, post, decl, plan)
    hooks = []
    if pre:
        hooks.append(Hook(st.module, "pre", tuple(pre)))
    if post:
        hooks.append(Hook(st.module, "post", tuple(post)))
    return hooks


def _sliced_by(st: Stage, plan: Plan, decl: Declarations) -> Dict[Arg, str]:
    """``{argument: dim}``: the companions of ``st`` that arrive sharded, and on which dim.

    A parent stage passes its per-frame conditioning down under the same argument name
    (``temb``, ``image_only_indicator``). Inside a stage, a companion it declares is sharded
    on the dim the stage runs on if its layout has that dim, else whole; the innermost
    enclosing stage that declares a name decides. Those that arrive sharded are gathered
    where the module needs them whole, not split again (run time checks the lengths: a
    companion that arrives whole after all fails loudly)."""
    around = [
        o
        for o in plan.stages
        if o.stream == st.stream and o.module and st.module.startswith(o.module + ".")
    ]

    def s_of(o: Stage) -> Stream:
        return plan.stream(o.stream)

    state: Dict[Arg, Optional[str]] = {}
    for outer in sorted(around, key=lambda o: -len(o.module)):
        if outer.kind in ("relayout", "gather_output") or encloses(outer.module, s_of(outer)):
            continue  # they do not touch their companions (see stage_hooks)
        runs_on = {"compute": outer.shard, "whole": None, "tp": None}.get(outer.kind, outer.rest)
        if runs_on is None:
            break  # whole inside: everything it passes down is whole
        _, extra = decl.split_inputs(outer.module, plan.stream(outer.stream))
        for k, lay in extra.items():
            if isinstance(k, str) and k not in state:
                state[k] = runs_on if runs_on in lay else None
    return {k: d for k, d in state.items() if d is not None}


def _chunked(
    st: Stage, label: str, pre: List[Act], post: List[Act], decl: Declarations, plan: Plan
):
    """The acts of a compute stage run in ``st.chunks`` overlapped slices: one ``chunked``
    act in place of its switch in and its switch back."""
    inner = [o.module for o in plan.stages if o.module.startswith(st.module + ".")]
    if inner:  # their acts would see a slice's shard, not the dim's
        raise PlanError(
            f"{label} ({st.module!r}): chunks={st.chunks} needs a stage with no stages inside "
            f"it; it holds {inner}"
        )
    switch_in = [a for a in pre if a.op == "switch"]
    switch_out = [a for a in post if a.op == "switch" and a.key is None]
    gathered = {a.key for a in pre if a.op == "allgather"}
    parts = [a for a in pre if a.op == "split" and a.dst == st.shard and a.key not in gathered]
    if len(switch_in) != 1 or len(pre) != 1 + len(parts) or len(switch_out) != 1 or len(post) != 1:
        others = sorted({a.op for a in pre + post if a not in parts} - {"switch"})
        raise PlanError(
            f"{label} ({st.module!r}): chunks={st.chunks} needs a stage whose only acts are one "
            f"switch of its input and one of its output; it has "
            + (f"{others} too" if others else f"{len(pre)} in and {len(post)} out")
            + " (companions or buffers on the dim it runs on, norms, a tuple output)"
        )
    if st.shard in decl.inner.get(st.module, ()):
        raise PlanError(f"{label} ({st.module!r}): chunks apply to stages on a stream's dims")
    a, b = switch_in[0], switch_out[0]
    act = Act(
        "chunked",
        a.key,
        a.layout,
        a.src,
        a.dst,
        label,
        degree=st.chunks,
        out=b.layout,
        parts=tuple((p.key, p.layout) for p in parts),
    )
    return [act], []


def encloses(module: str, s: Stream) -> bool:
    """Whether ``module`` contains the stream's entry (its forward runs around the region)."""
    return module == "" or s.entry.startswith(module + ".")


def _row_of(st: Stage, plan: Plan) -> Optional[str]:
    rows = [
        p.module for p in plan.params if p.style == "row" and p.module.startswith(st.module + ".")
    ]
    return rows[0] if rows else None


def _own_dims(s: Stream, suffix: str) -> Layout:
    """The stream's layout with its non-sequence dims renamed (``C`` -> ``C_out``): a tensor
    that keeps the sequence dims but may differ elsewhere (a head's output, an operand)."""
    return Layout(
        [
            tuple(d if d in s.seq or d == "1" else f"{d}_{suffix}" for d in g)
            for g in s.entry_layout.groups
        ]
    )


def compile_plan(plan: Plan, decl: Declarations) -> List[Hook]:
    """Every hook of ``plan``, in the order they must be registered.

    Order on a shared module: entry split, relayouts, stages' pre-hooks; then the stages'
    post-hooks, operand gathers and exit gathers.
    """
    hooks: List[Hook] = []
    if decl.inputs.get(""):  # the model's own inputs teach the dims' sizes (folds need them)
        binds = tuple(Act("bind", k, lay, label="bind") for k, lay in decl.inputs[""].items())
        hooks.append(Hook("", "pre", binds))
    for s in plan.streams:
        hooks += _entry(s)
    order = {"relayout": 0, "gather_output": 2}
    staged = sorted(enumerate(plan.stages), key=lambda p: order.get(p[1].kind, 1))
    for i, st in staged:
        hooks += stage_hooks(i, st, plan, decl)
    for s in plan.streams:
        hooks.append(exit_hook(s, _exit_rest(plan, s)))
    return hooks


def _exit_rest(plan: Plan, s: Stream) -> str:
    """The stream's resting dim at its exit: the last relayout's, or the entry shard."""
    moves = [st.shard for st in plan.stages if st.kind == "relayout" and st.stream == s.name]
    return moves[-1] if moves else s.shard


# ----------------------------------------------------------------------------- bytes
def _switch_bytes(shape: Tuple[int, ...], lay: Layout, src: str, dst: str, n: int, e: int) -> int:
    """Bytes all ranks send to switch a tensor of unfolded ``shape`` from ``src`` to ``dst``."""
    i, j = lay.index(src), lay.index(dst)
    li, lj = shape[i], shape[j]
    numel = 1
    for v in shape:
        numel *= v
    if n == 1 or numel == 0:
        return 0
    rest = numel // (li * lj)
    kept = rest * sum(a * b for a, b in zip(shard_sizes(li, n), shard_sizes(lj, n)))
    return e * (numel - kept)


def act_bytes(act: Act, info: TensorInfo, sizes: Dict[str, int], n: int) -> Tuple[int, int]:
    """``(forward, backward)`` bytes all ranks send for ``act`` on a tensor of full ``info``.

    ``sizes`` must hold every dim of the act's layout (bound from ``info`` by the caller).
    Attention acts take ``info`` of q (k, v and the output have the same shape here).
    """
    e, grad = info.itemsize, info.grad
    if n == 1 or act.op in ("split", "buffers", "bind"):
        return 0, 0
    shape = act.layout.unfolded(sizes)
    numel = info.numel
    if act.op == "switch":
        b = _switch_bytes(shape, act.layout, act.src, act.dst, n, e)
        return b, b if grad else 0
    if act.op == "gather":
        return e * numel * (n - 1), 0
    if act.op in ("allgather", "reducescatter"):
        b = e * numel * (n - 1)
        return b, b if grad else 0
    if act.op == "attend":
        return _attend_bytes(act, shape, numel, e, grad, n)
    raise PlanError(f"unknown act {act.op!r}")


def _attend_bytes(act: Act, shape, numel: int, e: int, grad: bool, n: int) -> Tuple[int, int]:
    lay = act.layout
    if act.kind == "heads":
        b = 4 * _switch_bytes(shape, lay, act.src, "H", n, e)
        return b, b if grad else 0
    u = (act.degree or 1) if act.kind == "usp" else 1
    r = n // u
    fwd = bwd = 0
    if act.kind == "usp" and u > 1:  # Ulysses inside each row of u ranks
        sizes = shard_sizes(shape[lay.index(act.src)], n)
        for row in range(r):
            chunk = list(shape)
            chunk[lay.index(act.src)] = sum(sizes[row * u : (row + 1) * u])
            b = 4 * _row_switch(chunk, lay, act.src, sizes[row * u : (row + 1) * u], u, e)
            fwd += b
            bwd += b if grad else 0
    if r > 1:  # k and v around the ring of r rows (heads sharded u ways inside)
        e_g = max(e, 4)
        fwd += 2 * e * numel * (r - 1)
        bwd += (2 * e * numel * (r - 1) + 2 * e_g * numel * r) if grad else 0
    return fwd, bwd


def _row_switch(shape, lay: Layout, src: str, src_sizes, u: int, e: int) -> int:
    """Bytes of a switch from ``src`` (lengths ``src_sizes``) to heads inside one row."""
    heads = shape[lay.index("H")]
    numel = 1
    for v in shape:
        numel *= v
    li = shape[lay.index(src)]
    rest = numel // (li * heads) if li * heads else 0
    kept = rest * sum(a * b for a, b in zip(src_sizes, shard_sizes(heads, u)))
    return e * (numel - kept)
