"""``dsp``: Dynamic Sequence Parallelism.

Shard T at the entry; every stage (the outermost module that needs one sequence dim whole,
see :func:`~dsp.strategies.base.find_stages`) that needs the currently sharded dim gets
``switch(T -> S)`` on its input and ``switch(S -> T)`` on its output; everything else
(spatial attention, norms, modulation, cross-attention, MLP) runs locally; gather T at the
exit. For STDiT that is two switches per layer around the temporal attention; for Latte two
around each temporal block.
"""

from __future__ import annotations

from torch import nn

from dsp.comm.primitives import switch
from dsp.strategies.base import SequenceSharded, find_stages


class DSP(SequenceSharded):
    name = "dsp"

    def install(self, model: nn.Module) -> None:
        super().install(model)
        spec = self.spec
        modules = dict(model.named_modules())
        sharded = spec.shard
        self.stages = find_stages(modules["blocks"], "blocks.")
        for name, dim in self.stages:
            if dim != sharded:
                continue  # computes over an unsharded dim: runs locally
            other = next(n for n in spec.dims[1:-1] if n != dim)  # the dim to shard instead
            src, dst = spec.index(dim), spec.index(other)

            def pre(_mod, args, src=src, dst=dst, dim=dim):
                # (B, T/N, S, C) -> (B, T, S/N, C)
                return (switch(args[0], src, dst, self.group, src_size=self.sizes[dim]), *args[1:])

            def post(_mod, _args, out, src=src, dst=dst, other=other):
                # (B, T, S/N, C) -> (B, T/N, S, C)
                return switch(out, dst, src, self.group, src_size=self.sizes[other])

            self.handles.append(modules[name].register_forward_pre_hook(pre))
            self.handles.append(modules[name].register_forward_hook(post))
