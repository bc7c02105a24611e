"""``none``: the single-process reference (no hooks, no communication)."""

from __future__ import annotations

from torch import nn

from dsp.strategies.base import Strategy


class NoParallel(Strategy):
    """Runs the model as written; every rank computes everything."""

    name = "none"

    def apply(self, model: nn.Module) -> nn.Module:
        return model

    def sync_grads(self, model: nn.Module) -> None:
        return None
