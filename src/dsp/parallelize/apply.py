"""Apply a plan to a model from outside: the compiled acts run in module hooks.

The plan compiles once (:func:`~dsp.parallelize.compile.compile_plan`) into fixed acts per
hook; the hooks keep no layout state, so a module re-run by activation checkpointing does
exactly what it did in the forward. The only state is the dims' full sizes, learned from
the tensors of each forward (reset at the model's own pre-hook).

Gradient convention (docs/primitives.md): the entry split and every companion split keep
this rank's gradient (no communication), the exit gather scales its gradient by N; with the
same loss on every rank, :meth:`Parallelized.sync_grads` (a mean all-reduce of every
replicated gradient) gives the single-process gradients.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from dsp.comm import collectives as C
from dsp.mesh import group_info
from dsp.parallelize.args import MISSING, Args
from dsp.parallelize.check import check_plan
from dsp.parallelize.compile import Act, Hook, compile_plan
from dsp.parallelize.declared import Declarations, read_declarations
from dsp.parallelize.plan import Plan, PlanError
from dsp.parallelize.runtime import Runtime
from dsp.parallelize.tensor_parallel import apply_param_styles

__all__ = ["Parallelized", "parallelize"]


class Parallelized:
    """The handle :func:`parallelize` returns: the plan, its compiled hooks and the group."""

    def __init__(
        self,
        model: nn.Module,
        plan: Plan,
        group: Optional[dist.ProcessGroup],
        decl: Declarations,
    ):
        self.model, self.plan, self.group, self.decl = model, plan, group, decl
        self.runtime = Runtime(group)
        self.info = self.runtime.info
        self.hooks: List[Hook] = compile_plan(plan, decl)
        self.handles: List[Any] = []
        self.tp_params: Dict[str, tuple] = {}

    @property
    def sizes(self) -> Dict[str, int]:
        """The dims' full sizes learned in the last forward."""
        return self.runtime.sizes

    def install(self) -> None:
        mods = dict(self.model.named_modules())
        if self.plan.params:
            self.tp_params = apply_param_styles(self.model, self.plan.params, self.info)
            mods = dict(self.model.named_modules())
        rt = self.runtime
        for u in sorted({a.degree or 1 for h in self.hooks for a in h.acts if a.kind == "usp"}):
            rt.usp_groups(u)  # every rank makes the subgroups together, before any forward
        self.handles.append(self.model.register_forward_pre_hook(rt.reset, prepend=True))
        for hook in self.hooks:
            mod = mods[hook.module]
            args = Args(mod)
            inside = tuple(a for a in hook.acts if a.op in ("attend", "norm", "buffers", "chunked"))
            if inside and hook.side == "pre":  # around the module's own forward (see _Around)
                self.handles.append(_Around(mod, inside, rt, args))
            hook = Hook(hook.module, hook.side, tuple(a for a in hook.acts if a not in inside))
            if not hook.acts:
                continue
            if hook.side == "pre":
                self.handles.append(
                    mod.register_forward_pre_hook(_pre(hook, args, rt, mod), with_kwargs=True)
                )
            else:
                self.handles.append(
                    mod.register_forward_hook(_post(hook, rt, mod, mods), always_call=True)
                )

    # ------------------------------------------------------------------ public
    def is_tensor_parallel(self, name: str) -> bool:
        """Whether parameter ``name`` is sliced across the group (a ``tp`` stage's weight)."""
        return name in self.tp_params

    def sync_grads(self, model: Optional[nn.Module] = None) -> None:
        """Average every replicated gradient over the group (tensor-parallel ones: / N)."""
        if self.info.size == 1:
            return
        replicated = []
        for name, p in (model or self.model).named_parameters():
            if p.grad is None:
                continue
            if name in self.tp_params:
                p.grad.div_(self.info.size)
            else:
                replicated.append(p.grad)
        C.all_reduce_coalesced(replicated, self.group, average=True, tag="grad_sync")

    def full_grads(self, model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
        """Every parameter's full gradient after :meth:`sync_grads` (tp slices gathered)."""
        from dsp.parallelize.tensor_parallel import full_grads

        return full_grads(model or self.model, self.tp_params, self.info)

    def remove(self) -> None:
        """Remove every hook (sliced weights stay sliced: apply a tp plan to a fresh model)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.runtime.reset(None, None)


def _pre(hook: Hook, sig: Args, rt: Runtime, mod: nn.Module):
    def run(_mod, args, kwargs):
        for act in hook.acts:
            x = sig.get(args, kwargs, act.key)
            if x is MISSING or x is None:
                continue
            what = f"{hook.module!r} input {act.key!r}"
            if act.op == "split" and _tensors(x):  # a tuple companion: (cos, sin) tables
                y = type(x)(rt.run(act, t, f"{what}[{i}]") for i, t in enumerate(x))
            elif torch.is_tensor(x):
                y = rt.run(act, x, what)
            else:
                raise PlanError(
                    f"{hook.module!r}: input {act.key!r} ({act.layout}) is a "
                    f"{type(x).__name__}, not a tensor"
                    + (
                        " (a tuple of tensors is split element by element)"
                        if act.op == "split"
                        else ""
                    )
                )
            args, kwargs = sig.set(args, kwargs, act.key, y)
        return args, kwargs

    return run


def _tensors(x: Any) -> bool:
    """A tuple or list of tensors (a companion whose every element has the declared layout)."""
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(torch.is_tensor(t) for t in x)


def _post(hook: Hook, rt: Runtime, mod: nn.Module, mods):
    def run(_mod, _args, out):
        if out is None:  # the forward raised (always_call): nothing to convert
            return None
        for act in hook.acts:
            what = f"{hook.module!r} output" + ("" if act.key is None else f" {act.key}")
            if act.key is None:
                out = rt.run(act, out, what, bias=_bias(act, mods))
            else:
                y = rt.run(act, out[act.key], what, bias=_bias(act, mods))
                out = type(out)(y if i == act.key else v for i, v in enumerate(out))
        return out

    return run


class _Around:
    """Wraps ``module.forward`` so that its attentions and norms are rerouted and its buffers
    sliced
    *inside* the forward: a recomputation by activation checkpointing (which re-runs the
    forward, not the hooks around it) does the same. Removed with the other hooks."""

    def __init__(self, mod: nn.Module, acts, rt: Runtime, sig: Args):
        self.mod = mod
        inner = mod.forward
        chunked = next((a for a in acts if a.op == "chunked"), None)
        acts = tuple(a for a in acts if a is not chunked)

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            entered = []
            try:
                for act in acts:
                    if act.op in ("attend", "norm"):
                        rt.push_attend(act)
                    else:
                        rt.slice_buffer(mod, act)
                    entered.append(act)
                if chunked is not None:  # slices switched and computed in turn, overlapped
                    return rt.chunked(chunked, inner, sig, args, kwargs)
                return inner(*args, **kwargs)
            finally:
                for act in reversed(entered):
                    if act.op in ("attend", "norm"):
                        rt.pop_attend(act)
                    else:
                        rt.restore_buffer(mod, act)

        mod.forward = forward

    def remove(self) -> None:
        self.mod.__dict__.pop("forward", None)


def _bias(act: Act, mods) -> Optional[torch.Tensor]:
    if act.bias is None:
        return None
    return getattr(mods[act.bias], "bias", None)


def parallelize(
    model: nn.Module,
    plan: Plan,
    group: Optional[dist.ProcessGroup] = None,
    *,
    example_inputs: Any = None,
    declare: Optional[dict] = None,
) -> Parallelized:
    """Apply ``plan`` to ``model`` on ``group`` with hooks; return the handle.

    The plan is checked against the model first (modules, arguments, dims, layouts); with
    ``example_inputs`` (tiny or meta tensors, or declared sizes) it is also dry-run for this
    group's size. Errors raise here, on every rank, before any collective. ``declare``: the
    model's declarations as data (docs/parallelize.md), as given to the planner.
    """
    from dsp.parallelize.cost import resolve_rests
    from dsp.parallelize.planner import record
    from dsp.parallelize.trace import declare_trace

    decl = read_declarations(model, plan.streams, declare=declare)
    check_plan(plan, model, decl)
    info = group_info(group)
    if example_inputs is not None:
        rec = record(model, example_inputs, streams=plan.streams, declare=declare)
        rec.cost(plan, info.size)
        plan = resolve_rests(plan, rec.trace)
    else:  # stages without rest, after relayouts: registration order tells where they run
        ones = {d: 1 for s in plan.streams for d in s.dims}
        plan = resolve_rests(plan, declare_trace(model, plan.streams, ones))
    handle = Parallelized(model, plan, group, decl)
    handle.install()
    return handle
