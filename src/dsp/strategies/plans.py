"""Strategies as plan generators: DSP and every baseline become plans for the one engine.

=============  ==============================================================================
strategy       plan
=============  ==============================================================================
``dsp``        the planner's plan for the example inputs (``plan="auto"``), the paper's hand
               placement (``"hand"``), or a given :class:`~dsp.parallelize.Plan`
``ulysses``    the stream rests on its entry dim; every attention over it is a ``heads``
               stage (q, k, v switched to heads and back: 4 all-to-alls, heads may be uneven)
``ring``       the same attentions as ``ring`` stages (k, v blocks around the ring)
``usp``        ``usp`` stages: heads over rows of ``ulysses_degree`` ranks x ring across rows
``megatron_sp`` every attention, cross-attention and MLP is a ``tp`` region (all-gather in,
               reduce-scatter out) with column/row-parallel weights (:func:`tp_styles`)
=============  ==============================================================================

Every generator also adds ``local`` stages where a module's companions (a frame position
table, per-row timesteps) hold the resting dim, so they are sliced with the activation.
Nothing here knows a model class: the generators read the model's streams and declarations.
"""

from __future__ import annotations

from typing import Any, List, Optional, Union

from torch import nn

from dsp.parallelize import Plan, PlanError, Stage, record
from dsp.parallelize.cost import region_calls
from dsp.parallelize.declared import Declarations

__all__ = ["attention_plan", "dsp_plan", "megatron_plan"]


def _recording(model: nn.Module, example_inputs: Any, declare=None, streams=None):
    """A recording of ``model``: real calls for example inputs, else registration order."""
    if example_inputs is None:
        known = streams or getattr(model, "dsp_streams", ())
        example_inputs = {d: 1 for s in known for d in s.dims}
    return record(model, example_inputs, declare=declare, streams=streams)


def _region(rec, stream: str) -> List[str]:
    """Modules called inside the stream's sharded region, in call order, once each."""
    s = next(x for x in rec.streams if x.name == stream)
    entry, exit_ = region_calls(rec.trace, s)
    seen: List[str] = []
    for c in rec.trace.calls:
        if entry.start <= c.start <= exit_.end and c.module not in seen:
            seen.append(c.module)
    return seen


def _locals(decl: Declarations, rec, taken: set) -> List[Stage]:
    """``local`` stages for modules whose companions or buffers hold the resting dim."""
    out = []
    for s in rec.streams:
        for module, bufs in decl.buffers.items():
            if module not in taken and any(s.shard in lay.names for lay in bufs.values()):
                out.append(Stage(module, s.name, kind="local", rest=s.shard))
                taken = taken | {module}
        for module in _region(rec, s.name):
            if module in taken:
                continue
            _, extra = decl.split_inputs(module, s) if module in decl.inputs else ({}, {})
            lays = list(extra.values()) + list((decl.buffers.get(module) or {}).values())
            if any(s.shard in lay.names for lay in lays):
                out.append(Stage(module, s.name, kind="local", rest=s.shard))
    return out


def attention_plan(
    model: nn.Module,
    kind: str,
    *,
    degree: Optional[int] = None,
    example_inputs: Any = None,
    declare=None,
    streams=None,
) -> Plan:
    """Ulysses (``heads``), Ring (``ring``) or USP (``usp``, with ``degree``): the stream
    rests on its entry dim and every attention over that dim becomes a ``kind`` stage."""
    rec = _recording(model, example_inputs, declare, streams)
    decl = rec.decl
    stages: List[Stage] = []
    for s in rec.streams:
        for module in _region(rec, s.name):
            own = decl.compute.get(module, ())
            if s.shard not in own:
                continue
            if module not in decl.sdpa:
                raise PlanError(
                    f"{kind}: module {module!r} computes over {own}, the dim the stream rests "
                    f"on, but declares no 'sdpa' layout: only attentions can run as {kind} "
                    "(use --strategy dsp)"
                )
            shard = s.shard if kind == "ring" else "H"
            stages.append(Stage(module, s.name, own, shard, kind, rest=s.shard, degree=degree))
    stages += _locals(decl, rec, {st.module for st in stages})
    return Plan(rec.streams, tuple(stages))


def megatron_plan(
    model: nn.Module, *, example_inputs: Any = None, declare=None, streams=None
) -> Plan:
    """Megatron-SP: ``tp`` regions with column/row-parallel weights (see module docstring)."""
    from dsp.models.plans import tp_styles

    rec = _recording(model, example_inputs, declare, streams)
    if len(rec.streams) != 1:
        raise PlanError(
            f"megatron_sp: {type(model).__name__} has {len(rec.streams)} streams "
            f"({[s.name for s in rec.streams]}); Megatron-SP shards one activation stream"
        )
    (s,) = rec.streams
    regions = tp_styles(model)
    if not regions:
        raise PlanError(f"megatron_sp: {type(model).__name__} has no attention/MLP regions")
    stages = [Stage(m, s.name, kind="tp", rest=s.shard) for m, _ in regions]
    params = tuple(p for _, styles in regions for p in styles)
    stages += _locals(rec.decl, rec, {st.module for st in stages})
    return Plan(rec.streams, tuple(stages), params)


def dsp_plan(
    model: nn.Module,
    world_size: int,
    *,
    plan: Any = "auto",
    example_inputs: Any = None,
    declare=None,
    streams=None,
    chunks: Union[int, str, None] = None,
    timing=None,
    price=None,
) -> Plan:
    """DSP: ``plan="auto"`` (the planner; needs ``example_inputs``), ``"hand"`` (the paper's
    placement for the models in :mod:`dsp.models`), or a :class:`Plan`. ``chunks``: the
    planner's compute stages run in that many overlapped slices where they can, or
    ``"auto"``: as many as ``timing`` predicts fastest (auto only; a hand plan or a plan
    file says its own). ``price``: place the stages for time (``Recording.plan``)."""
    if chunks not in (None, 1) and not (plan == "auto" and example_inputs is not None):
        raise ValueError(
            f"dsp: chunks={chunks!r} slices the planner's stages: it needs plan='auto' and "
            "example inputs (a hand plan or a plan file says its own Stage.chunks)"
        )
    if isinstance(plan, Plan):
        return plan
    if plan == "hand" or (plan == "auto" and example_inputs is None):
        from dsp.models.plans import hand_plan

        return hand_plan(model)
    if plan != "auto":
        raise ValueError(f"dsp: plan must be 'auto', 'hand' or a Plan, got {plan!r}")
    rec = record(model, example_inputs, declare=declare, streams=streams)
    return rec.plan(world_size, chunks=chunks, timing=timing, price=price)
