"""Per-rank bodies: Ulysses with q, k, v in one all-to-all equals DeepSpeed's three."""

from __future__ import annotations

import copy

import torch

import dsp
from dsp.models import build_model
from dsp.strategies import get_strategy
from tests.strategies._cases import make_inputs, run_model


def qkv_fused_equals_default(model_name, strategy, shape, overrides, options=None):
    """Outputs and every gradient bit-identical; the same bytes; fewer all-to-alls."""
    batch, frames, height, width = shape
    torch.manual_seed(0)
    base = build_model(model_name, zero_init=False, **overrides).double()
    inputs = make_inputs(base, batch, frames, height, width)
    w = torch.randn(
        base(*inputs).shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    runs = {}
    for fused in (False, True):
        model = copy.deepcopy(base)
        opts = dict(options or {}, qkv_one_all_to_all=fused)
        get_strategy(strategy, **opts).apply(model, inputs)
        with dsp.comm_log() as log:
            out, x, y = run_model(model, inputs, w)
        grads = {n: p.grad for n, p in model.named_parameters()}
        runs[fused] = (out, x.grad, y.grad, grads, log)
    (o0, x0, y0, g0, l0), (o1, x1, y1, g1, l1) = runs[False], runs[True]
    assert torch.equal(o0, o1) and torch.equal(x0, x1) and torch.equal(y0, y1)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert (g0[name] is None) == (g1[name] is None), name
        assert g0[name] is None or torch.equal(g0[name], g1[name]), name
    out = {}
    for phase in ("forward", "backward"):
        assert l0.sent(phase) == l1.sent(phase), phase
        out[phase] = (l0.count("all_to_all", phase), l1.count("all_to_all", phase))
    return out
