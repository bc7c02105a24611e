"""``megatron_sp``: Megatron-LM tensor parallelism with sequence parallelism.

The residual stream stays sharded on T. Every attention (spatial and temporal), the
cross-attention and the MLP form a tensor-parallel region: its input is all-gathered along T
(reduce-scatter in backward), its first linear layers are column-parallel (this rank's heads
or hidden units), its last is row-parallel, and its output partial sums are reduce-scattered
back to T shards (all-gather in backward); the row-parallel bias is added after the
reduce-scatter. Heads and hidden units are split by ``torch.tensor_split``, so N need not
divide them, but N must not exceed the number of heads.

Sharded weights are sliced from the full single-device weights, so a parallel model starts
from exactly the same parameters.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsp.comm import collectives as C
from dsp.comm.seqpar import all_gather_seq, reduce_scatter_seq
from dsp.comm.shards import shard_offsets
from dsp.models.layers import Attention, CrossAttention, Mlp
from dsp.strategies.base import SequenceSharded


class _RowParallelLinear(nn.Module):
    """``x @ W_r^T`` without the bias: the region adds ``bias`` after the reduce-scatter."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _column(lin: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    out = nn.Linear(
        lin.in_features,
        len(rows),
        bias=lin.bias is not None,
        dtype=lin.weight.dtype,
        device=lin.weight.device,
    )
    with torch.no_grad():
        out.weight.copy_(lin.weight[rows])
        if lin.bias is not None:
            out.bias.copy_(lin.bias[rows])
    return out


def _row(lin: nn.Linear, cols: torch.Tensor) -> _RowParallelLinear:
    bias = lin.bias.detach().clone() if lin.bias is not None else None
    return _RowParallelLinear(lin.weight.detach()[:, cols].clone(), bias)


class MegatronSP(SequenceSharded):
    name = "megatron_sp"

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        super().__init__(group)
        # parameter name -> (full shape, dim, rank -> index along dim)
        self.tp_params: Dict[str, tuple] = {}

    def is_tensor_parallel(self, name: str) -> bool:
        return name in self.tp_params

    def _units(self, total: int, width: int) -> Callable[[int], torch.Tensor]:
        """rank -> indices of its units (heads of ``width`` channels) among ``total``."""
        n = self.info.size

        def idx(r: int) -> torch.Tensor:
            offs = shard_offsets(total, n)
            return torch.arange(offs[r] * width, offs[r + 1] * width)

        return idx

    def _shard(
        self, prefix: str, mod: nn.Module, name: str, kind: str, idx, groups: int, stride: int
    ) -> None:
        """Replace ``mod.<name>`` by its column/row shard; remember how to rebuild grads."""
        lin = getattr(mod, name)

        def rows_of(r: int) -> torch.Tensor:  # fused layers: the same units in each group
            return torch.cat([idx(r) + g * stride for g in range(groups)])

        r = self.info.rank
        if kind == "column":
            setattr(mod, name, _column(lin, rows_of(r)))
            self.tp_params[f"{prefix}.{name}.weight"] = (tuple(lin.weight.shape), 0, rows_of)
            if lin.bias is not None:
                self.tp_params[f"{prefix}.{name}.bias"] = (tuple(lin.bias.shape), 0, rows_of)
        else:
            setattr(mod, name, _row(lin, idx(r)))
            self.tp_params[f"{prefix}.{name}.weight"] = (tuple(lin.weight.shape), 1, idx)

    def install(self, model: nn.Module) -> None:
        super().install(model)
        n = self.info.size
        for prefix, mod in list(model.named_modules()):
            if not prefix.startswith("blocks."):
                continue
            if isinstance(mod, (Attention, CrossAttention)):
                d = mod.head_dim
                c = mod.proj.in_features
                heads = c // d
                if heads < n:
                    raise ValueError(
                        f"dsp megatron_sp: {prefix} has {heads} heads, fewer than "
                        f"the {n} ranks; use another strategy or fewer ranks"
                    )
                idx = self._units(heads, d)
                if isinstance(mod, Attention):
                    self._shard(prefix, mod, "qkv", "column", idx, 3, c)
                else:
                    self._shard(prefix, mod, "q", "column", idx, 1, c)
                    self._shard(prefix, mod, "kv", "column", idx, 2, c)
                self._shard(prefix, mod, "proj", "row", idx, 1, 0)
                self._region(mod, mod.proj)
            elif isinstance(mod, Mlp):
                idx = self._units(mod.fc1.out_features, 1)
                self._shard(prefix, mod, "fc1", "column", idx, 1, 0)
                self._shard(prefix, mod, "fc2", "row", idx, 1, 0)
                self._region(mod, mod.fc2)

    def _region(self, mod: nn.Module, row: _RowParallelLinear) -> None:
        d = self.spec.index(self.spec.shard)

        def pre(_mod, args):
            # (B, T/N, S, C) -> (B, T, S, C)
            return (
                all_gather_seq(args[0], d, self.shard_sizes(self.spec.shard), self.info),
                *args[1:],
            )

        def post(_mod, _args, out):
            # partial sums (B, T, S, C) -> (B, T/N, S, C), then the bias once
            out = reduce_scatter_seq(out, d, self.shard_sizes(self.spec.shard), self.info)
            return out + row.bias if row.bias is not None else out

        self.handles.append(mod.register_forward_pre_hook(pre))
        self.handles.append(mod.register_forward_hook(post))

    def full_grads(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        out = super().full_grads(model)
        n = self.info.size
        for name, (shape, dim, idx_of) in self.tp_params.items():
            g = out[name].movedim(dim, 0).contiguous()  # (units_r, *rest)
            rest = g.shape[1:]
            inner = math.prod(rest)
            counts = [len(idx_of(r)) for r in range(n)]
            flat = C.all_gather(g, [k * inner for k in counts], self.group, tag="full_grads")
            parts: List[torch.Tensor] = list(flat.split([k * inner for k in counts]))
            full = torch.zeros((shape[dim], *rest), dtype=g.dtype)
            for r in range(n):
                full[idx_of(r)] = parts[r].view(counts[r], *rest)
            out[name] = full.movedim(0, dim)
        return out
