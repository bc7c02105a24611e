"""``usp``: Unified Sequence Parallelism, Ulysses x Ring on a 2-D grid of the group.

Group rank ``i`` sits at ``(ring i // u, ulysses i % u)`` for ``N = u * r``. T is sharded
over all N ranks. An attention over T first all-to-alls q, k, v inside its Ulysses row
(``u`` consecutive ranks: their T shards form one contiguous chunk) from sequence- to
head-sharded, then runs ring attention over that chunk across its ring column (the ranks
with the same heads), then all-to-alls the output back. ``u = N`` is Ulysses, ``u = 1`` Ring.
"""

from __future__ import annotations

from typing import List, Optional

import torch.distributed as dist
from torch import nn

from dsp.attention.ring import RingCore
from dsp.comm.shards import shard_sizes
from dsp.mesh import split_group
from dsp.strategies.base import SequenceSharded
from dsp.strategies.ulysses import UlyssesCore, sharded_attentions


class USP(SequenceSharded):
    name = "usp"

    def __init__(
        self, group: Optional[dist.ProcessGroup] = None, *, ulysses_degree: Optional[int] = None
    ):
        super().__init__(group)
        self.ulysses_degree = ulysses_degree

    def degrees(self, heads: int) -> tuple:
        """(ulysses, ring): the given Ulysses degree, or the largest divisor of N <= heads."""
        n = self.info.size
        u = self.ulysses_degree
        if u is None:
            u = max(d for d in range(1, n + 1) if n % d == 0 and d <= heads)
        if u < 1 or n % u:
            raise ValueError(f"dsp usp: ulysses_degree={u} must divide the group size {n}")
        return u, n // u

    def chunk_sizes(self, dim: str) -> List[int]:
        """Length of each Ulysses row's contiguous chunk of ``dim`` (ring block sizes)."""
        sizes = shard_sizes(self.sizes[dim], self.info.size)
        u = self.u
        return [sum(sizes[j * u : (j + 1) * u]) for j in range(self.info.size // u)]

    def install(self, model: nn.Module) -> None:
        super().install(model)
        dim = self.spec.shard
        attns = sharded_attentions(model, dim)
        heads = min(m.proj.in_features // m.head_dim for _, m in attns) if attns else 1
        self.u, self.r = self.degrees(heads)
        ulysses_group, ring_group = split_group(self.group, self.u)
        ring_idx = self.info.rank // self.u
        for _, mod in attns:
            ring = RingCore(ring_group, lambda: self.chunk_sizes(dim))
            mod.core = UlyssesCore(
                self,
                dim,
                ring,
                group=ulysses_group,
                seq_len=lambda: self.chunk_sizes(dim)[ring_idx],
            )
