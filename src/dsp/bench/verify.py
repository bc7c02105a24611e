"""Check that a strategy's output and gradients equal the single-process run (per rank)."""

from __future__ import annotations

import copy

import torch


def rank_verify(model_name: str, strategy: str, shape, overrides=None, options=None) -> dict:
    """Run the same step with and without ``strategy`` on this rank; return max differences.

    fp64, so a correct strategy differs only by summation order (~1e-12). Inputs and weights
    are seeded identically on every rank.
    """
    from dsp.models import build_model
    from dsp.strategies import get_strategy

    batch, frames, height, width = shape
    torch.manual_seed(0)
    model = build_model(model_name, zero_init=False, **(overrides or {})).double()
    ref = copy.deepcopy(model)
    c = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c.in_channels, frames, height, width, generator=g, dtype=torch.float64)
    y = torch.randn(batch, 8, c.caption_channels, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (batch,), generator=g)
    mask = torch.arange(8)[None] < torch.tensor([8 - 3 * (i % 2) for i in range(batch)])[:, None]

    out_ref = ref(x, t, y, mask)
    out_ref.square().mean().backward()
    strat = get_strategy(strategy, **(options or {}))
    strat.apply(model, (x, t, y))  # dsp: the planner's plan for these shapes
    out = model(x, t, y, mask)
    out.square().mean().backward()
    strat.sync_grads(model)
    grads = strat.full_grads(model)
    grad_diff = max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters())
    return {
        "output_max_abs_diff": (out - out_ref).abs().max().item(),
        "grad_max_abs_diff": grad_diff,
        "output_max_abs": out_ref.abs().max().item(),
    }
