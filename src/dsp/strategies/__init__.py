"""Sequence-parallel strategies behind one interface, selected by name.

>>> strategy = dsp.strategies.get_strategy("dsp", group)
>>> model = strategy.apply(model)        # hooks from outside; the model code is unchanged
>>> loss = loss_fn(model(x, t, y, mask)) # same output on every rank
>>> loss.backward(); strategy.sync_grads(model)
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from dsp.strategies.base import ModelSpec, SequenceSharded, Strategy, find_stages, model_spec
from dsp.strategies.dsp_strategy import DSP
from dsp.strategies.megatron_sp import MegatronSP
from dsp.strategies.none import NoParallel
from dsp.strategies.ring import Ring
from dsp.strategies.ulysses import Ulysses
from dsp.strategies.usp import USP

STRATEGIES = {
    "none": NoParallel,
    "dsp": DSP,
    "ulysses": Ulysses,
    "ring": Ring,
    "megatron_sp": MegatronSP,
    "usp": USP,
}


def get_strategy(name: str, group: Optional[dist.ProcessGroup] = None, **options) -> Strategy:
    """Build the strategy ``name`` (one of :data:`STRATEGIES`) on ``group``."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"dsp: unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}"
        ) from None
    return cls(group, **options)


__all__ = [
    "DSP",
    "MegatronSP",
    "ModelSpec",
    "NoParallel",
    "Ring",
    "STRATEGIES",
    "SequenceSharded",
    "Strategy",
    "USP",
    "Ulysses",
    "find_stages",
    "get_strategy",
    "model_spec",
]
