"""Apply a plan to a model from outside: module hooks, nothing in the model's code.

Hooks, registered in this order so that they compose on a shared module:

1. entry (pre-hook): split the stream's input on its entry dim, ``grad_mode="shard"`` (its
   backward keeps this rank's part, no communication: the gradient average completes it);
2. relayout (pre-hook on a block): switch the block's input to the new resting layout;
3. compute stage (pre- and forward hook): switch the first input to the stage's dim and the
   output back (or into the output stream's layout);
4. gather_output (forward hook): all-gather the output along the current layout
   (:func:`dsp.comm.seqpar.all_gather_seq`: its backward reduce-scatters, summing the partial
   gradients each rank's use of the whole operand produced);
5. exit (forward hook): gather the output, ``grad_scale="up"``.

With the same loss on every rank, :meth:`Parallelized.sync_grads` (mean all-reduce of every
parameter gradient) then gives the single-process gradients (docs/primitives.md).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dsp.comm import collectives as C
from dsp.comm.primitives import gather, split, switch
from dsp.comm.seqpar import all_gather_seq
from dsp.comm.shards import shard_sizes
from dsp.mesh import group_info
from dsp.parallelize.check import check_plan
from dsp.parallelize.declared import read_declarations
from dsp.parallelize.plan import Plan, PlanError, Stage, Stream

__all__ = ["Parallelized", "parallelize"]


class Parallelized:
    """The handle :func:`parallelize` returns: the plan, the hooks and the group."""

    def __init__(self, model: nn.Module, plan: Plan, group: Optional[dist.ProcessGroup]):
        self.model, self.plan, self.group = model, plan, group
        self.info = group_info(group)
        self.handles: List[Any] = []
        self.layout: Dict[str, Optional[str]] = {s.name: None for s in plan.streams}
        self.sizes: Dict[str, Dict[str, int]] = {}
        self._stack: List[Tuple[Optional[Stage], Optional[str]]] = []

    # ------------------------------------------------------------------ helpers
    def _switch(self, x: torch.Tensor, stream: Stream, src: str, dst: str) -> torch.Tensor:
        if src == dst:
            return x
        size = self.sizes[stream.name][src]
        return switch(x, stream.index(src), stream.index(dst), self.group, src_size=size)

    # ------------------------------------------------------------------ hooks
    def _entry(self, s: Stream):
        def hook(_mod, args):
            x = args[s.arg]
            if x.dim() != len(s.dims):
                raise PlanError(
                    f"stream {s.name!r} names {len(s.dims)} dims {s.dims}, but the input of "
                    f"{s.entry!r} has shape {tuple(x.shape)}"
                )
            self.sizes[s.name] = dict(zip(s.dims, x.shape))
            length, n = self.sizes[s.name][s.shard], self.info.size
            if length < n:
                raise PlanError(
                    f"stream {s.name!r}: dim {s.shard!r} of length {length} < {n} ranks"
                )
            self.layout[s.name] = s.shard
            x = split(x, s.index(s.shard), self.group, grad_mode="shard")  # full -> shard
            return args[: s.arg] + (x,) + args[s.arg + 1 :]

        return hook

    def _relayout(self, st: Stage, s: Stream):
        def hook(_mod, args):
            cur = self.layout[s.name]
            if cur is None:
                return None
            x = self._switch(args[s.arg], s, cur, st.shard)  # resting layout changes here
            self.layout[s.name] = st.shard
            return args[: s.arg] + (x,) + args[s.arg + 1 :]

        return hook

    def _stage(self, st: Stage, s: Stream):
        out_s = self.plan.stream(st.out_stream) if st.out_stream else None

        def pre(_mod, args):
            cur = self.layout[s.name]
            self._stack.append((st if cur is not None else None, cur))
            if cur is None:
                return None  # outside the sharded region: nothing to do
            self.layout[s.name] = st.shard
            return (self._switch(args[0], s, cur, st.shard), *args[1:])

        def post(_mod, _args, out):
            stage, prev = self._stack.pop()
            if stage is None:
                return None
            self.layout[s.name] = prev
            if out_s is None:
                return self._switch(out, s, st.shard, prev)
            target = self.layout[out_s.name]
            if target is None:
                raise PlanError(f"{st.module!r} writes stream {out_s.name!r} outside its region")
            return self._switch(out, out_s, st.out_shard, target)

        return pre, post

    def _gather_output(self, st: Stage, s: Stream):
        def hook(_mod, _args, out):
            cur = self.layout[s.name]
            if cur is None:
                return None
            if st.shard is not None and st.shard != cur:
                raise PlanError(
                    f"{st.module!r}: the plan gathers on {st.shard!r}, stream is on {cur!r}"
                )
            sizes = shard_sizes(self.sizes[s.name][cur], self.info.size)
            return all_gather_seq(out, s.index(cur), sizes, self.info)  # shard -> whole

        return hook

    def _exit(self, s: Stream):
        def hook(_mod, _args, out):
            cur = self.layout[s.name]
            if cur is None:
                return None
            x = out if s.out is None else out[s.out]
            size = self.sizes[s.name][cur]
            x = gather(x, s.index(cur), self.group, size=size, grad_scale="up")  # shard -> full
            self.layout[s.name] = None
            if s.out is None:
                return x
            return type(out)(x if i == s.out else v for i, v in enumerate(out))

        return hook

    def install(self) -> None:
        mods = dict(self.model.named_modules())
        plan, h = self.plan, self.handles
        for s in plan.streams:
            h.append(mods[s.entry].register_forward_pre_hook(self._entry(s)))
        for st in plan.stages:
            if st.kind == "relayout":
                h.append(
                    mods[st.module].register_forward_pre_hook(
                        self._relayout(st, plan.stream(st.stream))
                    )
                )
        for st in plan.stages:
            if st.kind == "compute":
                pre, post = self._stage(st, plan.stream(st.stream))
                h.append(mods[st.module].register_forward_pre_hook(pre))
                h.append(mods[st.module].register_forward_hook(post))
        for st in plan.stages:
            if st.kind == "gather_output":
                h.append(
                    mods[st.module].register_forward_hook(
                        self._gather_output(st, plan.stream(st.stream))
                    )
                )
        for s in plan.streams:
            h.append(mods[s.exit].register_forward_hook(self._exit(s)))
        # every forward starts clean, even after one that raised half-way
        h.append(self.model.register_forward_pre_hook(self._reset, prepend=True))

    def _reset(self, _mod, _args) -> None:
        self._stack.clear()
        for name in self.layout:
            self.layout[name] = None

    # ------------------------------------------------------------------ public
    def sync_grads(self, model: Optional[nn.Module] = None) -> None:
        """Average every parameter gradient over the group (in place)."""
        grads = [p.grad for p in (model or self.model).parameters() if p.grad is not None]
        C.all_reduce_coalesced(grads, self.group, average=True, tag="grad_sync")

    def remove(self) -> None:
        """Remove every hook: the model is single-device again."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def parallelize(
    model: nn.Module,
    plan: Plan,
    group: Optional[dist.ProcessGroup] = None,
    *,
    example_inputs: Any = None,
) -> Parallelized:
    """Apply ``plan`` to ``model`` on ``group`` with hooks; return the handle.

    The plan is checked against the model first (modules, dims, compute sets, operands);
    with ``example_inputs`` (tiny or meta tensors, or declared sizes) it is also dry-run for
    this group's size. Errors raise here, on every rank, before any collective.
    """
    decl = read_declarations(model, plan.streams)
    check_plan(plan, model, decl)
    handle = Parallelized(model, plan, group)
    if example_inputs is not None:
        from dsp.parallelize.planner import record

        record(model, example_inputs, streams=plan.streams).cost(plan, handle.info.size)
    handle.install()
    return handle
