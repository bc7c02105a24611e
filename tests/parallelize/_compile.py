"""Per-rank bodies: a parallelized model under ``torch.compile``."""

from __future__ import annotations

import copy

import torch

import dsp
from dsp.models import build_model
from dsp.strategies import get_strategy


def compiled_equals_eager(backend: str = "aot_eager", chunks: int = 1):
    """``torch.compile`` of a model DSP parallelized (planner's plan, fp64) gives the eager
    parallelized model's output and gradients, and sends the same bytes on every call."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build_model("stdit-tiny", zero_init=False).double()
    x = torch.randn(1, 4, 7, 12, 12, dtype=torch.float64)
    t, y = torch.tensor([3]), torch.randn(1, 16, 16, dtype=torch.float64)
    twin = copy.deepcopy(model)
    get_strategy("dsp", None, chunks=chunks).apply(model, (x, t, y))
    get_strategy("dsp", None, chunks=chunks).apply(twin, (x, t, y))
    counters.clear()
    compiled = torch.compile(twin, backend=backend)

    def step(m):
        with dsp.comm_log() as log:
            out = m(x, t, y)
            out.square().sum().backward()
        return out, log

    out, log = step(model)
    for _ in range(2):  # the second call runs the cached graphs
        twin.zero_grad()
        out_c, log_c = step(compiled)
        torch.testing.assert_close(out_c, out, atol=1e-10, rtol=0)
        for (name, a), b in zip(twin.named_parameters(), model.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-9, msg=name)
        assert (log_c.sent("forward"), log_c.sent("backward")) == (
            log.sent("forward"),
            log.sent("backward"),
        )
        assert log_c.count() == log.count() > 0
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
    }
