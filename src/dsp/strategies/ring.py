"""``ring``: ring attention with the fair placement.

T stays sharded everywhere; an attention over T passes key/value blocks around the ring
(:func:`dsp.attention.ring_attention`, online softmax merged in fp32); attention over S runs
locally.
"""

from __future__ import annotations

from torch import nn

from dsp.attention.ring import ring_attention
from dsp.strategies.base import SequenceSharded
from dsp.strategies.ulysses import sharded_attentions


class RingSeqCore:
    """Attention core: ring attention over the sharded sequence of ``owner``'s group."""

    def __init__(self, group, seq_sizes):
        self.group, self.seq_sizes = group, seq_sizes  # seq_sizes: () -> list of lengths

    def __call__(self, q, k, v, mask=None):
        if mask is not None:
            raise ValueError("dsp ring: self-attention over a sharded dim takes no mask")
        return ring_attention(q, k, v, self.group, seq_sizes=self.seq_sizes())


class Ring(SequenceSharded):
    name = "ring"

    def install(self, model: nn.Module) -> None:
        super().install(model)
        dim = self.spec.shard
        for _, mod in sharded_attentions(model, dim):
            mod.core = RingSeqCore(self.group, lambda dim=dim: self.shard_sizes(dim))
