"""The strategy interface and what every sequence-sharded strategy shares.

A strategy parallelizes a single-device model *from outside*: forward hooks at the entry and
exit of the sharded region, replaced attention cores, swapped modules. Models never branch
on the strategy. Supported models expose (as :mod:`dsp.models` does): ``blocks`` (the
transformer blocks, whose activations are ``(B, T, S, C)``), ``final_layer`` (token-wise head),
attention modules with ``attn_dim``/``compute_dim`` and a replaceable ``core``, and
:class:`~dsp.models.layers.TemporalPosEmbed` for frame positions.

Gradient convention (docs/primitives.md): the exit gather uses ``grad_scale="up"`` and the
entry split ``grad_mode="shard"`` (no backward communication), so after ``loss.backward()``
with the same loss on every rank, :meth:`Strategy.sync_grads` *averages* every replicated
gradient over the group (what DDP and FSDP do over a dp x sp mesh) and obtains the
single-process gradient. Gradients of replicated inputs are averaged the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dsp.comm import collectives as C
from dsp.comm.primitives import gather, split
from dsp.comm.shards import shard_offsets, shard_sizes
from dsp.mesh import GroupInfo, group_info
from dsp.models.layers import TemporalPosEmbed, sincos_1d

__all__ = ["ModelSpec", "Strategy", "SequenceSharded", "model_spec", "find_stages"]


@dataclass(frozen=True)
class ModelSpec:
    """Where the sharded region of a model starts and ends, and its activation layout."""

    entry: str = "blocks.0"  # its first positional input is split
    exit: str = "final_layer"  # its output is gathered
    dims: Tuple[str, ...] = ("B", "T", "S", "C")
    shard: str = "T"  # the dim sharded at the entry

    def index(self, name: str) -> int:
        return self.dims.index(name)


def model_spec(model: nn.Module) -> ModelSpec:
    """The spec of a supported model, or a clear error naming what is missing."""
    names = dict(model.named_modules())
    spec = ModelSpec()
    for need in (spec.entry, spec.exit):
        if need not in names:
            raise ValueError(
                f"dsp: {type(model).__name__} has no module {need!r}; strategies need a model "
                "with `blocks` (B, T, S, C) and a token-wise `final_layer` (see dsp.models)"
            )
    return spec


def compute_dims(module: nn.Module) -> set:
    """The sequence dims a module (or anything inside it) needs whole."""
    return {m.compute_dim for m in module.modules() if hasattr(m, "compute_dim")}


def find_stages(root: nn.Module, prefix: str = "") -> List[Tuple[str, str]]:
    """Outermost modules that need exactly one sequence dim whole, in registration order.

    A module whose subtree needs one dim is a stage; one that needs several is searched
    further; token-wise modules (none) are skipped.
    """
    out: List[Tuple[str, str]] = []
    for name, child in root.named_children():
        full = f"{prefix}{name}"
        dims = compute_dims(child)
        if len(dims) == 1:
            out.append((full, next(iter(dims))))
        elif len(dims) > 1:
            out.extend(find_stages(child, full + "."))
    return out


class Strategy:
    """Base class: ``apply(model)`` installs the strategy; ``sync_grads`` after backward."""

    name = "base"

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.info: Optional[GroupInfo] = None
        self.handles: list = []

    def apply(self, model: nn.Module) -> nn.Module:
        self.info = group_info(self.group)
        self.install(model)
        return model

    def install(self, model: nn.Module) -> None:  # pragma: no cover - overridden
        pass

    def remove(self) -> None:
        """Remove the hooks (module swaps stay: apply a strategy to a fresh model)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def is_tensor_parallel(self, name: str) -> bool:
        """Whether parameter ``name`` is sharded across the group (tensor parallelism)."""
        return False

    def sync_grads(self, model: nn.Module) -> None:
        """Average replicated parameters' gradients over the group (in place).

        All replicated gradients travel in one flat buffer (one all-reduce per dtype), so the
        cost is one collective's latency plus ``2 (N-1)/N`` of the gradient bytes.
        """
        if self.info is None or self.info.size == 1:
            return
        n = self.info.size
        replicated = []
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            if self.is_tensor_parallel(name):
                p.grad.div_(n)
            else:
                replicated.append(p.grad)
        C.all_reduce_coalesced(replicated, self.group, average=True, tag="grad_sync")

    def full_grads(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """Every parameter's full gradient (after :meth:`sync_grads`), for comparisons."""
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


class _GlobalTemporalPosEmbed(TemporalPosEmbed):
    """TemporalPosEmbed that numbers frames globally when its input holds a T shard."""

    def __init__(self, base: TemporalPosEmbed, owner: SequenceSharded):
        super().__init__(base.scale)
        self.owner = owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t_local, t_full = x.shape[1], self.owner.sizes["T"]
        start = 0 if t_local == t_full else self.owner.offset("T")
        pos = (torch.arange(t_local, device=x.device) + start) / self.scale
        return x + sincos_1d(x.shape[-1], pos).to(x.dtype)[None, :, None, :]


class SequenceSharded(Strategy):
    """Split ``spec.shard`` at the entry, gather it at the exit, number frames globally."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        super().__init__(group)
        self.sizes: Dict[str, int] = {}
        self.spec = ModelSpec()

    def offset(self, dim: str) -> int:
        """Start of this rank's shard of ``dim`` in the full dim."""
        return shard_offsets(self.sizes[dim], self.info.size)[self.info.rank]

    def shard_sizes(self, dim: str) -> List[int]:
        return shard_sizes(self.sizes[dim], self.info.size)

    def install(self, model: nn.Module) -> None:
        self.spec = spec = model_spec(model)
        modules = dict(model.named_modules())
        d = spec.index(spec.shard)

        def entry(_mod, args):
            x = args[0]  # (B, T, S, C), full
            self.sizes = {n: x.shape[i] for i, n in enumerate(spec.dims)}
            # (B, T, S, C) -> (B, T/N, S, C). Backward: this rank's gradient, zero-padded (no
            # comm): sync_grads averages replicated gradients over the group anyway.
            x = split(x, d, self.group, grad_mode="shard")
            return (x, *args[1:])

        def exit_(_mod, _args, out):
            # (B, T/N, S, P) -> (B, T, S, P)
            return gather(out, d, self.group, size=self.sizes[spec.shard], grad_scale="up")

        self.handles.append(modules[spec.entry].register_forward_pre_hook(entry))
        self.handles.append(modules[spec.exit].register_forward_hook(exit_))
        for name, mod in list(model.named_modules()):
            if type(mod) is TemporalPosEmbed:
                parent, _, attr = name.rpartition(".")
                setattr(
                    modules[parent] if parent else model, attr, _GlobalTemporalPosEmbed(mod, self)
                )
