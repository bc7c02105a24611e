"""Weights of ``tp`` stages (Megatron-SP): column- and row-parallel slices of Linear layers.

Slices are cut from the full single-device weights, so a parallel model starts from the
same parameters. Units (heads of ``unit`` channels, or hidden units) are split with
``torch.tensor_split`` lengths, so N need not divide them (N must not exceed them).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsp.comm import collectives as C
from dsp.comm.shards import shard_offsets
from dsp.mesh import GroupInfo
from dsp.parallelize.plan import ParamStyle, PlanError

__all__ = ["apply_param_styles", "full_grads"]


class RowParallelLinear(nn.Module):
    """``x @ W_r^T`` without the bias: the ``tp`` stage adds ``bias`` after the reduce-scatter."""

    def __init__(self, weight: torch.Tensor, bias):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _units(total: int, width: int, n: int) -> Callable[[int], torch.Tensor]:
    """rank -> indices of its units (of ``width`` channels each) among ``total``."""
    offs = shard_offsets(total, n)
    return lambda r: torch.arange(offs[r] * width, offs[r + 1] * width)


def apply_param_styles(model: nn.Module, params: Sequence[ParamStyle], info: GroupInfo) -> Dict:
    """Replace each named Linear by this rank's slice; return ``{param: (shape, dim, idx)}``."""
    mods = dict(model.named_modules())
    out: Dict[str, tuple] = {}
    n, r = info.size, info.rank
    for p in params:
        lin = mods.get(p.module)
        if not isinstance(lin, nn.Linear):
            raise PlanError(
                f"param style for {p.module!r}: not an nn.Linear ({type(lin).__name__})"
            )
        if p.units < n:
            raise PlanError(
                f"{p.module!r} has {p.units} units (heads), fewer than the {n} ranks; use "
                "another strategy or fewer ranks"
            )
        idx = _units(p.units, p.unit, n)
        parent, _, attr = p.module.rpartition(".")
        owner = mods[parent] if parent else model
        if p.style == "column":
            stride = lin.out_features // p.groups

            def rows(rank, idx=idx, stride=stride, groups=p.groups):
                return torch.cat([idx(rank) + g * stride for g in range(groups)])

            new = nn.Linear(
                lin.in_features,
                len(rows(r)),
                bias=lin.bias is not None,
                dtype=lin.weight.dtype,
                device=lin.weight.device,
            )
            with torch.no_grad():
                new.weight.copy_(lin.weight[rows(r)])
                if lin.bias is not None:
                    new.bias.copy_(lin.bias[rows(r)])
            out[f"{p.module}.weight"] = (tuple(lin.weight.shape), 0, rows)
            if lin.bias is not None:
                out[f"{p.module}.bias"] = (tuple(lin.bias.shape), 0, rows)
        else:
            bias = lin.bias.detach().clone() if lin.bias is not None else None
            new = RowParallelLinear(lin.weight.detach()[:, idx(r)].clone(), bias)
            out[f"{p.module}.weight"] = (tuple(lin.weight.shape), 1, idx)
        setattr(owner, attr, new)
    return out


def full_grads(model: nn.Module, tp: Dict[str, tuple], info: GroupInfo) -> Dict[str, torch.Tensor]:
    """Every parameter's full gradient; sliced ones gathered from every rank."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    n = info.size
    for name, (shape, dim, idx_of) in tp.items():
        g = grads[name].movedim(dim, 0).contiguous()  # (units_r, *rest)
        rest = g.shape[1:]
        inner = math.prod(rest)
        counts = [len(idx_of(r)) for r in range(n)]
        flat = C.all_gather(g, [k * inner for k in counts], info.group, tag="full_grads")
        parts: List[torch.Tensor] = list(flat.split([k * inner for k in counts]))
        full = torch.zeros((shape[dim], *rest), dtype=g.dtype)
        for r in range(n):
            full[idx_of(r)] = parts[r].view(counts[r], *rest)
        grads[name] = full.movedim(0, dim)
    return grads
