"""Checks of a plan against a model and a world size, before anything runs.

:func:`check_plan` needs only the model's structure; :func:`validate` (the dry run) also walks
the plan through a recording of the model (:func:`dsp.parallelize.cost.simulate`). Neither
needs a process group or issues a collective.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping, Optional

from torch import nn

from dsp.parallelize.declared import Declarations, every_dim_message, read_declarations
from dsp.parallelize.plan import Plan, PlanError, Stage, Stream

__all__ = ["check_plan", "validate"]


def _missing(name: str, what: str, model: nn.Module, names) -> PlanError:
    close = difflib.get_close_matches(name, list(names), n=3)
    hint = f"; did you mean {close}?" if close else ""
    return PlanError(
        f"{what} names module {name!r}, which {type(model).__name__} does not have{hint}"
    )


def _has(stream: Stream, dims, what: str) -> None:
    for d in dims:
        if d not in stream.dims:
            raise PlanError(
                f"{what} names dim {d!r}, but the tensors of stream {stream.name!r} have dims "
                f"{stream.dims}: no dim {d!r}"
            )


def check_plan(plan: Plan, model: nn.Module, decl: Optional[Declarations] = None) -> None:
    """Static checks of ``plan`` against ``model`` (no sizes, no process group)."""
    decl = decl or read_declarations(model, plan.streams)
    names = dict(model.named_modules())
    for s in plan.streams:
        what = f"stream {s.name!r}"
        if len(set(s.dims)) != len(s.dims):
            raise PlanError(f"{what}: dim names {s.dims} are not unique")
        _has(s, s.seq, what)
        _has(s, [s.shard], f"{what} (entry shard)")
        for m in (s.entry, s.exit):
            if m not in names:
                raise _missing(m, what, model, names)
    seen = set()
    for i, st in enumerate(plan.stages):
        what = f"stage {i} ({st.kind} {st.module!r})"
        stream = plan.stream(st.stream)
        if st.module not in names:
            raise _missing(st.module, what, model, names)
        key = (st.kind, st.module, st.stream)
        if key in seen:
            raise PlanError(f"{what} appears twice in the plan")
        seen.add(key)
        moves = st.kind in ("compute", "relayout", "gather_output", "ring")
        if st.kind == "compute" and st.shard in decl.inner.get(st.module, ()):
            moves = False  # the module's own dim ('shard' declaration), not the stream's
        mine = decl.own_compute.get(st.module, ())  # an enclosing stage's own dims
        dims = tuple(d for d in st.compute if d not in mine)
        _has(stream, dims + ((st.shard,) if st.shard and moves else ()), what)
        own_rest = any(st.rest in decl.inner.get(o.module, ()) for o in plan.stages)
        if st.rest is not None and st.rest not in stream.seq and not own_rest:
            raise PlanError(f"{what}: rest {st.rest!r} is not a sequence dim of {stream.seq}")
        if moves and st.shard is not None and st.shard not in stream.seq:
            raise PlanError(f"{what}: {st.shard!r} is not a sequence dim of {stream.seq}")
        if st.kind == "relayout" and st.module not in decl.boundaries.get(st.stream, ()):
            raise PlanError(
                f"{what}: a relayout must sit at a block boundary of stream {st.stream!r} "
                f"(the blocks after its entry: {decl.boundaries.get(st.stream, [])})"
            )
        if st.kind == "relayout" and st.shard is None:
            raise PlanError(f"{what}: a relayout needs the dim to shard")
        if st.kind == "compute":
            _check_compute(st, stream, plan, decl, what, names)
        if st.kind in ("heads", "ring", "usp") and st.module not in decl.sdpa:
            raise PlanError(
                f"{what}: a {st.kind} stage needs the module's 'sdpa' declaration (the layout "
                "of q, k, v in its scaled_dot_product_attention calls, e.g. '(B S) H T D')"
            )
        if st.kind == "usp" and (not st.degree or st.degree < 1):
            raise PlanError(f"{what}: a usp stage needs degree >= 1, got {st.degree!r}")
    for p in plan.params:
        if p.module not in names:
            raise _missing(p.module, "param style", model, names)


def validate(
    plan: Plan,
    model: nn.Module,
    world_size: int,
    inputs: Any = None,
    *,
    even_only: bool = False,
    compute: Optional[Mapping[str, Any]] = None,
    operands: Optional[Mapping[str, Any]] = None,
    declare: Optional[Mapping[str, Any]] = None,
):
    """Dry run: check ``plan`` against ``model`` and ``world_size`` without any process group.

    Static checks always; with ``inputs`` (example inputs, tiny or meta, or declared sizes)
    the plan is also walked through a recording of the model, which checks every module that
    needs a dim whole, every operand used whole and every shard's legality for
    ``world_size``. Returns the :class:`~dsp.parallelize.cost.PlanCost` (bytes) or ``None``.

    Raises:
        PlanError: the first problem found, naming the stage, module, dims and sizes.
    """
    from dsp.parallelize.planner import record

    decl = read_declarations(model, plan.streams, compute, operands, declare)
    check_plan(plan, model, decl)
    if inputs is None:
        return None
    rec = record(
        model, inputs, streams=plan.streams, compute=compute, operands=operands, declare=declare
    )
    return rec.cost(plan, world_size, even_only=even_only)


def _check_compute(st: Stage, stream: Stream, plan: Plan, decl, what: str, names) -> None:
    if not st.compute:
        raise PlanError(f"{what}: a compute stage names the dims it computes over")
    mine = decl.own_compute.get(st.module, ())  # nested: an enclosing stage's own dims
    _has(stream, tuple(d for d in st.compute if d not in mine), what)
    own = st.shard in decl.inner.get(st.module, ())  # runs on a dim of its own ('shard')
    if set(stream.seq) <= set(st.compute) and not own:
        raise PlanError(f"{what}: " + every_dim_message(st.module, st.compute, [stream]))
    for s in plan.streams:
        inside = [m for m in (s.entry, s.exit) if m.startswith(st.module + ".") or not st.module]
        if inside:
            raise PlanError(
                f"{what}: the module contains {inside[0]!r}, where stream {s.name!r} is split "
                "or gathered; a stage must lie inside the sharded region"
            )
    if st.shard is None or st.shard in st.compute:
        raise PlanError(
            f"{what}: shard {st.shard!r} must be a sequence dim it does not compute over"
        )
    declared = [d for d in decl.subtree.get(st.module, ()) if d in stream.seq]
    if set(declared) - set(st.compute):
        raise PlanError(
            f"{what}: the module declares it computes over {tuple(declared)} (compute_dim), "
            f"but the plan says {st.compute}"
        )
    if (st.out_stream is None) != (st.out_shard is None):
        raise PlanError(f"{what}: give both out_stream and out_shard, or neither")
    if st.out_stream is not None:
        _has(plan.stream(st.out_stream), [st.out_shard], what)
    gathered = {g.module for g in plan.stages if g.kind == "gather_output"}
    prefix = st.module + "."
    for op, (user, _) in decl.operands.items():
        if (user == st.module or user.startswith(prefix)) and op not in gathered:
            raise PlanError(
                f"{what}: {user!r} uses the output of {op!r} whole (full_operands), but the "
                "plan has no gather_output stage for it"
            )
