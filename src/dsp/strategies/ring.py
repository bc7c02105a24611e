"""``ring``: ring attention with the fair placement.

T stays sharded everywhere; an attention over T passes key/value blocks around the ring
(:func:`dsp.attention.ring_attention`, online softmax merged in fp32); attention over S runs
locally.
"""

from __future__ import annotations

from torch import nn

from dsp.attention.ring import RingCore
from dsp.strategies.base import SequenceSharded
from dsp.strategies.ulysses import sharded_attentions


class Ring(SequenceSharded):
    name = "ring"

    def install(self, model: nn.Module) -> None:
        super().install(model)
        dim = self.spec.shard
        for _, mod in sharded_attentions(model, dim):
            mod.core = RingCore(self.group, lambda dim=dim: self.shard_sizes(dim))
