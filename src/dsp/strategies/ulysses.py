"""``ulysses``: DeepSpeed-Ulysses with the fair placement.

T stays sharded everywhere. An attention over the sharded dim (T) all-to-alls q, k and v from
sequence-sharded to head-sharded, attends over the full sequence on its heads, and
all-to-alls the output back: four all-to-alls per such attention. Attention over S runs
locally. Heads need not divide by N: they are split unevenly (``torch.tensor_split``), as
DeepSpeed does.
"""

from __future__ import annotations

from torch import nn

from dsp.comm.primitives import switch
from dsp.strategies.base import SequenceSharded


class UlyssesCore:
    """Wraps an attention core: seq-sharded (N', L/N, H, D) -> head-sharded -> back."""

    def __init__(self, owner: SequenceSharded, dim: str, inner, group=None, seq_len=None):
        self.owner, self.dim, self.inner = owner, dim, inner
        self.group = group if group is not None else owner.group
        # full length of the sequence across ``group`` (USP: the group's chunk of T)
        self.seq_len = seq_len or (lambda: owner.sizes[dim])

    def __call__(self, q, k, v, mask=None):
        if mask is not None:
            raise ValueError("dsp ulysses: self-attention over a sharded dim takes no mask")
        seq, heads = self.seq_len(), q.shape[2]
        # (N', L/N, H, D) -> (N', L, H/N, D)
        q, k, v = (switch(t, 1, 2, self.group, src_size=seq) for t in (q, k, v))
        out = self.inner(q, k, v, mask=None)
        return switch(out, 2, 1, self.group, src_size=heads)  # -> (N', L/N, H, D)


def sharded_attentions(model: nn.Module, dim: str):
    """(name, module) of every attention under ``blocks`` that attends over ``dim``."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if n.startswith("blocks.") and getattr(m, "attn_dim", None) == dim and hasattr(m, "core")
    ]


class Ulysses(SequenceSharded):
    name = "ulysses"

    def install(self, model: nn.Module) -> None:
        super().install(model)
        for _, mod in sharded_attentions(model, self.spec.shard):
            mod.core = UlyssesCore(self, self.spec.shard, mod.core)
