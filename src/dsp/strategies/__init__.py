"""Sequence-parallel strategies: one interface, each a plan for the one engine.

>>> strategy = dsp.strategies.get_strategy("dsp", group)
>>> strategy.apply(model, example_inputs)   # plans, then dsp.parallelize: hooks from outside
>>> loss = loss_fn(model(x, t, y, mask))    # same output on every rank
>>> loss.backward(); strategy.sync_grads(model)

Every strategy is a plan generator (:mod:`dsp.strategies.plans`); :func:`dsp.parallelize`
applies the plan. ``strategy.plan`` is the plan it applied (print it, save it as JSON).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from dsp.mesh import group_info
from dsp.parallelize import Parallelized, Plan, parallelize
from dsp.strategies.plans import attention_plan, dsp_plan, megatron_plan

__all__ = [
    "STRATEGIES",
    "Strategy",
    "get_strategy",
    "load_plan",
    "meta_like",
    "overlap_options",
]

STRATEGIES = ("none", "dsp", "ulysses", "ring", "megatron_sp", "usp")


class Strategy:
    """A named plan generator bound to a group; :meth:`apply` parallelizes a model.

    Options: ``plan`` (``dsp``: ``"auto"``, ``"hand"`` or a :class:`Plan`),
    ``ulysses_degree`` (``usp``), ``qkv_one_all_to_all`` (``ulysses``, ``usp``: move q, k, v
    to heads in one all-to-all, same bytes, instead of DeepSpeed's three; default ``False``),
    ``chunks`` (``dsp``: run every compute stage that can in that many overlapped slices,
    ``Stage.chunks``; default 1, blocking; ``"auto"``: the planner chooses per stage from
    predicted time on ``cluster``, a :class:`~dsp.sim.hardware.Cluster`, a preset name or a
    dict of its fields, for a training step or, with ``training=False``, a forward),
    ``declare`` and ``streams`` (the declarations of a model without attributes,
    docs/parallelize.md).
    """

    def __init__(self, name: str, group: Optional[dist.ProcessGroup] = None, **options):
        if options.get("qkv_one_all_to_all") and name not in ("ulysses", "usp"):
            raise ValueError(
                f"dsp {name}: qkv_one_all_to_all applies to ulysses and usp (their q, k, v "
                "all-to-alls), not to this strategy"
            )
        chunks = options.get("chunks")
        if chunks not in (None, 1) and name != "dsp":
            raise ValueError(
                f"dsp {name}: chunks (overlapped switches) apply to dsp's compute stages, not "
                "to this strategy"
            )
        if chunks == "auto" and options.get("cluster") is None:
            raise ValueError(
                "dsp dsp: chunks='auto' chooses each stage's slices from predicted time: give "
                "cluster= (a Cluster, a preset such as '8xh100-nvlink', or a dict of its fields)"
            )
        self.name, self.group, self.options = name, group, options
        self.plan: Optional[Plan] = None
        self.handle: Optional[Parallelized] = None

    def make_plan(self, model: nn.Module, example_inputs: Any = None) -> Optional[Plan]:
        """The plan this strategy applies to ``model`` (``None`` for ``none``)."""
        n = group_info(self.group).size
        given = {k: self.options.get(k) for k in ("declare", "streams")}
        if self.name == "none":
            return None
        if self.name == "dsp":
            plan = load_plan(self.options.get("plan") or "auto")
            chunks, timing = self.options.get("chunks"), None
            if chunks == "auto":
                from dsp.sim.hardware import cluster
                from dsp.sim.plan_price import timing as cluster_timing

                timing = cluster_timing(
                    cluster(self.options["cluster"]),
                    n,
                    training=self.options.get("training", True),
                    itemsize_scale=self.options.get("itemsize_scale", 1.0),
                )
            return dsp_plan(  # with a cluster: placed for its time too, as dsp plan --cluster
                model,
                n,
                plan=plan,
                example_inputs=example_inputs,
                chunks=chunks,
                timing=timing,
                price=timing.price if timing is not None else None,
                **given,
            )
        if self.name == "megatron_sp":
            return megatron_plan(model, example_inputs=example_inputs, **given)
        kind = {"ulysses": "heads", "ring": "ring", "usp": "usp"}[self.name]
        degree = self.usp_degree(model, n) if self.name == "usp" else None
        return attention_plan(model, kind, degree=degree, example_inputs=example_inputs, **given)

    def usp_degree(self, model: nn.Module, n: int) -> int:
        """The given Ulysses degree, or the largest divisor of N not above the head count."""
        u = self.options.get("ulysses_degree")
        if u is None:
            heads = min(
                (
                    m.proj.in_features // m.head_dim
                    for m in model.modules()
                    if hasattr(m, "head_dim") and hasattr(m, "proj")
                ),
                default=1,
            )
            u = max(d for d in range(1, n + 1) if n % d == 0 and d <= heads)
        if u < 1 or n % u:
            raise ValueError(f"dsp usp: ulysses_degree={u} must divide the group size {n}")
        return u

    def apply(self, model: nn.Module, example_inputs: Any = None) -> nn.Module:
        """Plan (on ``example_inputs`` where the strategy plans: tiny or meta tensors of the
        real shapes) and install the plan's hooks. Returns the model."""
        self.plan = self.make_plan(model, example_inputs)
        if self.plan is not None:
            self.handle = parallelize(  # with example inputs: dry-run first (every check)
                model,
                self.plan,
                self.group,
                example_inputs=example_inputs,
                declare=self.options.get("declare"),
            )
            self.handle.runtime.qkv_one_all_to_all = bool(self.options.get("qkv_one_all_to_all"))
        return model

    def sync_grads(self, model: Optional[nn.Module] = None) -> None:
        """Average replicated gradients over the group (one coalesced all-reduce)."""
        if self.handle is not None:
            self.handle.sync_grads(model)

    def full_grads(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """Every parameter's full gradient after :meth:`sync_grads` (tp slices gathered)."""
        if self.handle is None:
            return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return self.handle.full_grads(model)

    def is_tensor_parallel(self, name: str) -> bool:
        return self.handle is not None and self.handle.is_tensor_parallel(name)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def load_plan(plan: Any) -> Any:
    """``"auto"``, ``"hand"``, a :class:`Plan`, or the path of a plan's JSON file."""
    if isinstance(plan, Plan) or plan in ("auto", "hand"):
        return plan
    path = Path(plan)
    try:
        return Plan.from_json(path.read_text())
    except OSError as e:
        raise ValueError(
            f"--plan {plan}: not 'auto', 'hand' or a readable plan file ({e})"
        ) from None


def meta_like(*tensors: Any) -> tuple:
    """Shape-only (meta) copies of example inputs, for planning without data or compute."""
    return tuple(t.to("meta") if torch.is_tensor(t) else t for t in tensors)


def get_strategy(name: str, group: Optional[dist.ProcessGroup] = None, **options) -> Strategy:
    """The strategy ``name`` (one of :data:`STRATEGIES`) on ``group``."""
    if name not in STRATEGIES:
        raise ValueError(f"dsp: unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return Strategy(name, group, **options)


def overlap_options(
    strategy: str,
    chunks: Any,
    cluster: Any,
    *,
    training: bool,
    amp: Optional[torch.dtype] = None,
) -> dict:
    """The strategy options of ``--chunks`` / ``--cluster`` (``dsp train``, ``dsp sample``):
    ``{}`` for none; a ``ValueError`` naming the flag for what cannot work. ``amp``: the
    autocast dtype the run computes in (its switches then carry that dtype, not the fp32
    the plan is recorded in)."""
    if chunks in (None, 1):
        if cluster is not None:
            raise ValueError("--cluster describes the machine for --chunks auto; give both")
        return {}
    if strategy != "dsp":
        raise ValueError(f"--chunks overlaps dsp's switches; --strategy {strategy} has none")
    if chunks != "auto":
        if cluster is not None:
            raise ValueError("--cluster is for --chunks auto (a fixed count needs no machine)")
        return {"chunks": chunks}
    if cluster is None:
        raise ValueError(
            "--chunks auto chooses each stage's slices from predicted time: give --cluster "
            "(a preset such as 8xh100-nvlink or 2x8xh100-ib, or a JSON file)"
        )
    from dsp.sim.hardware import cluster as read_cluster

    read_cluster(cluster)  # an unknown preset fails here, before any rank starts
    scale = torch.finfo(amp).bits / 32 if amp is not None else 1.0
    return {"chunks": "auto", "cluster": cluster, "training": training, "itemsize_scale": scale}
