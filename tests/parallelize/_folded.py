"""Per-rank bodies for a model written like real code (docs/examples/parallelize_folded.py)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import dsp
import dsp.parallelize as P
from dsp.strategies import get_strategy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docs" / "examples"))
import parallelize_folded as folded  # noqa: E402


def _mean(t):
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def run(model, inputs, w):
    x = inputs[0].detach().clone().requires_grad_()
    out = model(x, *inputs[1:])
    (out * w).sum().backward()
    return out, x.grad


def equality(how: str = "planner", kinds=None, checkpointed: bool = False, atol: float = 1e-9):
    """Output, every parameter gradient and the input gradient equal one process; returns
    this rank's bytes, the dry run's prediction and the plan's stage kinds."""
    n = dist.get_world_size()
    model, inputs = folded.make()
    ref = copy.deepcopy(model)
    w = torch.randn(
        inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    out_ref, gx_ref = run(ref, inputs, w)
    options = {"streams": folded.STREAMS, "declare": folded.DECLARE}
    if how == "planner":
        rec = P.record(model, inputs, **options)
        plan = rec.plan(n, kinds=kinds)
        predicted = rec.cost(plan, n).total
        handle = dsp.parallelize(model, plan, declare=folded.DECLARE)
        sync = handle.sync_grads
    else:  # a strategy's plan generator
        rec = P.record(model, inputs, **options)  # before any hook is installed
        strategy = get_strategy(how, **options)
        strategy.apply(model, inputs)
        plan, sync = strategy.plan, strategy.sync_grads
        predicted = rec.cost(plan, n).total
    if checkpointed:
        _checkpoint(model)
    with dsp.comm_log() as log:
        out, gx = run(model, inputs, w)
    sync()
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=0)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=0, msg=name)
    torch.testing.assert_close(_mean(gx), gx_ref, atol=atol, rtol=0)
    return {
        "sent": log.sent("forward") + log.sent("backward"),
        "predicted": predicted,
        "kinds": {st.module: st.kind for st in plan.stages},
    }


def _checkpoint(model) -> None:
    """Recompute every block and the full attention in backward (hooks inside run again)."""
    from torch.utils.checkpoint import checkpoint

    for mod in [*model.spatial, *model.temporal]:
        inner = mod.attn.forward
        mod.attn.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    outer = model.forward
    model.forward = lambda *a, _f=outer, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def bad_declaration(change: dict, streams=None):
    """Record with a broken declaration on every rank: the error, before any collective."""
    model, inputs = folded.make()
    declare = {**folded.DECLARE, **change}
    try:
        rec = P.record(model, inputs, streams=streams or folded.STREAMS, declare=declare)
        dsp.parallelize(model, rec.plan(dist.get_world_size()), declare=declare)
    except P.PlanError as e:
        return str(e)
    return None
