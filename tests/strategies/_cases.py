"""Per-rank bodies: a strategy's forward and gradients equal the single process."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import dsp
import dsp.parallelize as P
from dsp.models import build_model
from dsp.strategies import get_strategy

TEXT_LEN = 6


def make_inputs(model, batch, frames, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch, c.in_channels, frames, height, width, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randn(batch, TEXT_LEN, c.caption_channels, generator=g, dtype=torch.float64)
    lengths = [TEXT_LEN - 2 * (i % 3) for i in range(batch)]  # prompts of different lengths
    mask = torch.arange(TEXT_LEN)[None] < torch.tensor(lengths)[:, None]
    return x, t, y, mask


def run_model(model, inputs, w):
    x, t, y, mask = inputs
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    out = model(x, t, y, mask)
    (out * w).sum().backward()
    return out, x, y


def _mean(t):
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def equality(model_name, strategy, shape, options=None, atol=1e-9):
    """Forward output, every parameter gradient and the input gradients equal one process."""
    batch, frames, height, width = shape
    torch.manual_seed(0)
    model = build_model(model_name, zero_init=False).double()
    ref = copy.deepcopy(model)
    inputs = make_inputs(model, batch, frames, height, width)
    w = torch.randn(
        ref(*inputs).shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    out_ref, x_ref, y_ref = run_model(ref, inputs, w)

    rec = P.record(model, inputs)  # before any hook: the dry run of the strategy's plan
    strat = get_strategy(strategy, **(options or {}))
    strat.apply(model, inputs)
    predicted = rec.cost(strat.plan, dist.get_world_size())
    with dsp.comm_log() as log:
        out, x, y = run_model(model, inputs, w)
    strat.sync_grads(model)

    torch.testing.assert_close(out, out_ref, atol=atol, rtol=0)
    grads = strat.full_grads(model)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=atol, rtol=0, msg=name)
    torch.testing.assert_close(_mean(x.grad), x_ref.grad, atol=atol, rtol=0)
    torch.testing.assert_close(_mean(y.grad), y_ref.grad, atol=atol, rtol=0)
    return {
        "forward": log.sent("forward"),
        "backward": log.sent("backward"),
        "ops": [(r.op, r.phase) for r in log.records if not r.meta],
        "predicted": predicted.total,
    }


def measure(model_name, strategy, shape, options=None, **overrides):
    """Bytes sent by this rank in one forward and one backward (no reference run)."""
    batch, frames, height, width = shape
    torch.manual_seed(0)
    model = build_model(model_name, zero_init=False, **overrides).double()
    inputs = make_inputs(model, batch, frames, height, width)
    get_strategy(strategy, **({"plan": "hand"} | (options or {}))).apply(model, inputs)
    with dsp.comm_log() as log:
        out, _, _ = run_model(model, inputs, 1.0)
    return {"forward": log.sent("forward"), "backward": log.sent("backward")}


def saved_bytes(model_name, strategy, shape, options=None, dtype=torch.float32):
    """Bytes of activations this rank saves for backward in one forward."""
    from dsp.memory import saved_activations

    batch, frames, height, width = shape
    torch.manual_seed(0)
    model = build_model(model_name, zero_init=False).to(dtype)
    x, t, y, mask = make_inputs(model, batch, frames, height, width)
    if strategy != "single":
        example = (x.to(dtype), t, y.to(dtype), mask)
        get_strategy(strategy, **(options or {})).apply(model, example)
    with saved_activations(model.parameters()) as saved:
        out = model(x.to(dtype).requires_grad_(), t, y.to(dtype), mask)
    out.sum().backward()
    return saved.bytes
