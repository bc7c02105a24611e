"""Parallelize a diffusers model or pipeline: declarations by class, a plan per input shapes.

:func:`parallelize` checks everything it can without inputs (the class is declared, the model
is not parallelized yet, the group can carry its dtype) and returns a
:class:`DiffusersParallel` handle. The plan needs the shapes of a call (frames, patches,
batch, classifier-free guidance), so it is made at the model's first call, from shape-only
(``meta``) copies of that call's inputs, by the chosen strategy, and installed with
:func:`dsp.parallelize` before the call runs; a call with other shapes plans again. Every
rank plans alike from the same inputs, so a bad input raises on every rank before any
collective. ``example_inputs=`` plans at once instead.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dsp.mesh import group_info, split_group
from dsp.parallelize import Plan, PlanCost, PlanError, Recording, record
from dsp.strategies import STRATEGIES, Strategy, get_strategy

__all__ = ["DiffusersParallel", "ParallelPipeline", "parallelize"]

#: The denoiser components a pipeline may hold (Wan 2.2 has two transformers).
DENOISERS = ("transformer", "transformer_2", "unet")
#: dtypes gloo all-reduces (gradients, ``sync_grads``); others need NCCL or a cast.
GLOO_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DiffusersParallel:
    """One parallelized diffusers model: its declarations, the strategy, the current plan.

    Attributes: ``model``, ``streams`` and ``declare`` (the declarations used), ``strategy``
    (the :class:`~dsp.strategies.Strategy` of the current plan), ``plan``, ``recording`` (the
    shape-only recording the plan was made from).
    """

    def __init__(
        self, model: nn.Module, group, strategy: str, options: Dict[str, Any], spec, cfg_group=None
    ):
        self.model, self.group, self.strategy_name = model, group, strategy
        self.cfg_group = cfg_group
        self.options = options
        self.streams, self.declare = spec
        self.strategy: Optional[Strategy] = None
        self.plan: Optional[Plan] = None
        self.recording: Optional[Recording] = None
        self.key: Optional[tuple] = None
        self.warned: set = set()
        self._planning = False

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        """Route the model's calls through :meth:`_call` (an instance attribute: the class,
        its forward and its other instances are untouched; :meth:`remove` undoes it)."""
        object.__setattr__(self.model, "_dsp_parallel", self)
        object.__setattr__(self.model, "_call_impl", self._call)

    def _call(self, *args, **kwargs):
        if self._planning:
            return type(self.model)._call_impl(self.model, *args, **kwargs)
        batch = None
        if self.cfg_group is not None:  # this half of the ranks: its half of the batch
            args, kwargs, batch = _cfg_half(args, kwargs, group_info(self.cfg_group))
        key = _signature(args, kwargs)
        if key != self.key:
            self.prepare(args, kwargs, key)
        out = type(self.model)._call_impl(self.model, *args, **kwargs)
        return out if batch is None else _cfg_gather(out, batch, self.cfg_group)

    def prepare(self, args: tuple, kwargs: Dict[str, Any], key: Optional[tuple] = None) -> Plan:
        """Plan for inputs of these shapes (from meta copies) and install the plan's hooks."""
        self._unhook()
        n = group_info(self.group).size
        example = tuple(_meta(a) for a in args) + ({k: _meta(v) for k, v in kwargs.items()},)
        options = {"streams": self.streams, "declare": self.declare}
        self._planning = True
        try:
            self.recording = record(self.model, example, **options)
            self._warn_short_dims(n)
            strategy = get_strategy(self.strategy_name, self.group, **options, **self.options)
            strategy.apply(self.model, example)
        finally:
            self._planning = False
        self.strategy, self.plan = strategy, strategy.plan
        self.key = key if key is not None else _signature(args, kwargs)
        return self.plan

    def _warn_short_dims(self, n: int) -> None:
        """Say once per dim and size that a sequence dim shorter than N stays whole."""
        sizes = dict(self.recording.trace.sizes)
        for s in self.streams:
            for d in s.seq:
                if sizes[d] < n and (d, sizes[d]) not in self.warned:
                    self.warned.add((d, sizes[d]))
                    warnings.warn(
                        f"dsp: {type(self.model).__name__} has {sizes[d]} {_NAMES.get(d, d)} "
                        f"({d}) on {n} ranks: {d} is not sharded (no empty shards); the "
                        "planner uses the other dims",
                        RuntimeWarning,
                        stacklevel=4,
                    )

    # ------------------------------------------------------------------ public
    def dry_run(self) -> PlanCost:
        """Bytes the current plan sends per forward (and backward) on the planned shapes."""
        if self.plan is None:
            raise PlanError("no plan yet: call the model once (or pass example_inputs=)")
        return self.recording.cost(self.plan, group_info(self.group).size)

    def sync_grads(self) -> None:
        """Average replicated gradients over the group (training: the single-process ones)."""
        if self.strategy is not None:
            self.strategy.sync_grads(self.model)

    def _unhook(self) -> None:
        if self.strategy is not None:
            self.strategy.remove()
        self.strategy, self.plan, self.key = None, None, None

    def remove(self) -> None:
        """Remove every hook: the model is single-device again."""
        self._unhook()
        for attr in ("_call_impl", "_dsp_parallel"):
            self.model.__dict__.pop(attr, None)


class ParallelPipeline:
    """What :func:`parallelize` returns for a pipeline: one handle per denoiser."""

    def __init__(self, pipeline, handles: Dict[str, DiffusersParallel]):
        self.pipeline, self.handles = pipeline, handles

    def __getitem__(self, name: str) -> DiffusersParallel:
        return self.handles[name]

    def remove(self) -> None:
        for h in self.handles.values():
            h.remove()


_NAMES = {"F": "frames", "S": "patches per frame"}


def _first_tensor(args: tuple, kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    return next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v)), None)


def _cfg_half(args: tuple, kwargs: Dict[str, Any], info):
    """CFG-parallel: the model's batch (``[unconditional, conditional]``) halved; rank ``h``
    of the CFG pair keeps half ``h`` of every tensor whose dim 0 is a multiple of the batch
    (per-frame text ``(B*F, L, C)`` included: its rows are batch-major)."""
    x = _first_tensor(args, kwargs)
    batch = x.shape[0]
    if batch % 2:
        raise PlanError(
            f"dsp cfg: the model's batch is {batch}, not the even [unconditional, conditional] "
            "batch of classifier-free guidance; parallelize without cfg=True"
        )

    def half(v):
        if torch.is_tensor(v) and v.dim() and v.shape[0] % batch == 0:
            rows = v.shape[0] // 2
            return v.narrow(0, info.rank * rows, rows)
        return v

    return tuple(half(a) for a in args), {k: half(v) for k, v in kwargs.items()}, batch


def _cfg_gather(out: Any, batch: int, group) -> Any:
    """The two halves' outputs, gathered on dim 0 over the CFG pair (one all-gather each)."""
    from dsp.comm.primitives import gather

    def whole(v):
        if torch.is_tensor(v) and v.dim() and v.shape[0] * 2 == batch:
            return gather(v, 0, group, size=batch, grad_scale="up")
        return v

    if isinstance(out, dict):  # diffusers' BaseOutput
        return type(out)(**{k: whole(v) for k, v in out.items()})
    if isinstance(out, (tuple, list)):
        return type(out)(whole(v) for v in out)
    return whole(out)


def _meta(x: Any) -> Any:
    """A shape-only copy of ``x`` (tensors inside tuples, lists and dicts too)."""
    if torch.is_tensor(x):
        return x.detach().to("meta").requires_grad_(x.requires_grad)
    if isinstance(x, (tuple, list)):
        return type(x)(_meta(v) for v in x)
    if isinstance(x, dict):
        return {k: _meta(v) for k, v in x.items()}
    return x


def _signature(args: tuple, kwargs: Dict[str, Any]) -> tuple:
    """What a plan depends on: shapes and dtypes of tensors, plain values, the grad mode."""

    def sig(x):
        if torch.is_tensor(x):
            return ("T", tuple(x.shape), x.dtype, x.device.type, x.requires_grad)
        if isinstance(x, (tuple, list)):
            return tuple(sig(v) for v in x)
        if isinstance(x, dict):
            return tuple(sorted((k, sig(v)) for k, v in x.items()))
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        return type(x).__name__

    return (sig(args), sig(kwargs), torch.is_grad_enabled())


# ----------------------------------------------------------------------------- checks
def _is_pipeline(obj: Any) -> bool:
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), dict)


def _denoisers(pipe) -> List[Tuple[str, nn.Module]]:
    found = [(n, getattr(pipe, n, None)) for n in DENOISERS]
    found = [(n, m) for n, m in found if isinstance(m, nn.Module)]
    if not found:
        names = sorted(k for k, v in pipe.components.items() if v is not None)
        raise PlanError(
            f"dsp: {type(pipe).__name__} has no transformer or unet to parallelize "
            f"(its components: {names}); pass the denoising model itself"
        )
    return found


def _check_model(model: nn.Module, group, strategy: str) -> None:
    if "_dsp_parallel" in model.__dict__:
        raise PlanError(
            f"dsp: this {type(model).__name__} is already parallelized; call .remove() on the "
            "handle parallelize returned first"
        )
    if strategy == "megatron_sp":
        raise PlanError(
            "dsp: megatron_sp needs column/row weight styles for the model's Linears, which "
            "the diffusers declarations do not give; use dsp, ulysses, ring, usp or none"
        )
    if strategy not in STRATEGIES:
        raise PlanError(f"dsp: unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    info = group_info(group)
    if info.size > 1 and dist.get_backend(group) == "gloo":
        bad = sorted(
            {str(p.dtype) for p in model.parameters() if p.is_floating_point()}
            - {str(d) for d in GLOO_DTYPES}
        )
        if bad:
            raise PlanError(
                f"dsp: {type(model).__name__} has parameters of dtype {', '.join(bad)}, which "
                f"gloo cannot reduce (it carries {[str(d) for d in GLOO_DTYPES]}); cast the "
                "model (model.to(torch.bfloat16)) or use the NCCL backend"
            )


def parallelize(
    model_or_pipeline: Any,
    group: Optional[dist.ProcessGroup] = None,
    strategy: str = "dsp",
    *,
    example_inputs: Any = None,
    cfg: bool = False,
    **options,
):
    """Sequence-parallelize a diffusers video model, or the denoiser(s) of a pipeline.

    Args:
        model_or_pipeline: a declared model (:func:`~dsp.integrations.diffusers.supported`)
            or a pipeline holding one as ``transformer`` / ``transformer_2`` / ``unet``.
        group: the process group (``None``: the world).
        strategy: ``dsp`` (the planner's plan), ``ulysses``, ``ring``, ``usp`` or ``none``.
        example_inputs: the model's inputs (a tuple, optionally ending in a dict of keyword
            inputs; meta tensors are enough) to plan now instead of at the first call.
        cfg: CFG-parallel (inference): the unconditional and conditional halves of each
            call's batch run on two halves of the group, each with the strategy inside;
            the outputs are all-gathered over the pair. Needs an even group size.
        options: strategy options (``plan="auto"`` or a :class:`~dsp.parallelize.Plan`,
            ``ulysses_degree`` for usp).

    Returns:
        a :class:`DiffusersParallel` (model) or :class:`ParallelPipeline` (pipeline).
    Raises:
        PlanError: an undeclared class, a pipeline without a denoiser, a model already
            parallelized, a dtype the group cannot carry; on every rank, before any
            collective.
    """
    from dsp.integrations.diffusers import declarations

    if _is_pipeline(model_or_pipeline):
        if example_inputs is not None:
            raise PlanError("dsp: example_inputs are for a model, not a pipeline")
        found = _denoisers(model_or_pipeline)
    else:
        found = [("model", model_or_pipeline)]
    specs = {}
    for name, model in found:  # every check before anything is installed
        specs[name] = declarations(model)
        _check_model(model, group, strategy)
    inner, cfg_group = group, None
    if cfg:
        n = group_info(group).size
        if n % 2:
            raise PlanError(f"dsp cfg: CFG-parallel needs an even number of ranks, got {n}")
        inner, cfg_group = split_group(group, n // 2)  # halves x the pairs across them
    handles = {}
    for name, model in found:
        handles[name] = DiffusersParallel(model, inner, strategy, options, specs[name], cfg_group)
        handles[name].install()
    if not _is_pipeline(model_or_pipeline):
        handle = handles["model"]
        if example_inputs is not None:
            args, kwargs = _split(example_inputs)
            handle.prepare(args, kwargs)
        return handle
    return ParallelPipeline(model_or_pipeline, handles)


def _split(inputs: Any) -> Tuple[tuple, Dict[str, Any]]:
    from dsp.parallelize.trace import split_inputs

    return split_inputs(inputs)
