"""Record what a model does once, or describe it from declared sizes.

:func:`trace_model` runs the model on example inputs (tiny tensors, or tensors on the
``meta`` device: no memory, no compute) with hooks on every module, and records each call:
its tensor inputs by position and keyword, its outputs, the
``scaled_dot_product_attention`` calls inside it, and when declared buffers are read.
:func:`declare_trace` describes the same without running anything: modules are assumed to
run in registration order and every tensor at a stage to have its stream's full shape.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from dsp.parallelize.args import Args
from dsp.parallelize.plan import Arg, PlanError, Stream

__all__ = ["Call", "TensorInfo", "Trace", "declare_trace", "trace_model"]


class TensorInfo(NamedTuple):
    """Full (single-process) shape of a tensor, whether it requires grad, its element size."""

    shape: Tuple[int, ...]
    grad: bool
    itemsize: int = 4

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _info(x: Any) -> Optional[TensorInfo]:
    if not torch.is_tensor(x):
        return None
    return TensorInfo(tuple(x.shape), bool(x.requires_grad), x.element_size())


def _infos(x: Any) -> Tuple[Optional[TensorInfo], ...]:
    if isinstance(x, (tuple, list)):
        return tuple(_info(v) for v in x)
    return (_info(x),)


@dataclass(frozen=True)
class Call:
    """One call of a module: ``start`` at its pre-hook, ``end`` at its forward hook.

    ``inputs`` holds every tensor input under its position and, where the signature names
    it, its name too; ``outs`` the output (the elements of a tuple output).
    """

    module: str
    start: int
    end: int
    inputs: Tuple[Tuple[Arg, TensorInfo], ...] = ()
    outs: Tuple[Optional[TensorInfo], ...] = ()
    flops: int = 0  # forward FLOPs of the call, modules inside included (0: not recorded)

    def input(self, key: Arg) -> Optional[TensorInfo]:
        for k, v in self.inputs:
            if k == key:
                return v
        return None

    def output(self, index: Optional[int]) -> Optional[TensorInfo]:
        i = 0 if index is None else index
        return self.outs[i] if 0 <= i < len(self.outs) else None


@dataclass(frozen=True)
class Attend:
    """One ``scaled_dot_product_attention`` call at ``clock``: q, k, v as passed."""

    clock: int
    q: TensorInfo
    k: TensorInfo
    v: TensorInfo


@dataclass(frozen=True)
class NormCall:
    """One ``group_norm`` call at ``clock``: its input and number of groups."""

    clock: int
    x: TensorInfo
    groups: int


@dataclass(frozen=True)
class Trace:
    """The calls of one forward, the named dims' full sizes and the element size."""

    streams: Tuple[Stream, ...]
    sizes: Tuple[Tuple[str, int], ...]
    itemsize: int
    calls: Tuple[Call, ...]
    grad: bool = True  # default for tensors whose info was not recorded (declared traces)
    attends: Tuple[Attend, ...] = ()
    buffer_uses: Tuple[Tuple[int, str, str], ...] = ()  # (clock, module, attribute)
    declared: bool = field(default=False)
    norms: Tuple[NormCall, ...] = ()

    def size(self, dim: str) -> int:
        return dict(self.sizes)[dim]

    def shape(self, stream: Stream) -> Tuple[int, ...]:
        """The stream's full shape at its entry."""
        return stream.entry_layout.full_shape(dict(self.sizes))

    def tensor(self, info: Optional[TensorInfo], stream: Stream) -> TensorInfo:
        """``info``, or the stream's full shape when nothing was recorded."""
        if info is not None:
            return info
        return TensorInfo(self.shape(stream), self.grad, self.itemsize)

    def inside(self, call: Call) -> List[Attend]:
        """The attention calls made while ``call`` ran."""
        return [a for a in self.attends if call.start < a.clock < call.end]

    def norms_inside(self, call: Call) -> List[NormCall]:
        """The ``group_norm`` calls made while ``call`` ran."""
        return [m for m in self.norms if call.start < m.clock < call.end]


class _Watched(torch.Tensor):
    """A parameter or buffer that reports each use (the trace knows when a parent reads it)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.on_use()
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    on_use = staticmethod(lambda: None)


def sdpa_arguments(args: tuple, kwargs: dict):
    """``((q, k, v), other args, other kwargs)`` of a ``scaled_dot_product_attention`` call,
    whether q, k, v came by position or as ``query=``, ``key=``, ``value=`` (diffusers'
    native attention backend passes them by keyword)."""
    kwargs = dict(kwargs)
    args = list(args)
    qkv = []
    for name in ("query", "key", "value"):
        qkv.append(kwargs.pop(name) if name in kwargs else args.pop(0))
    return tuple(qkv), tuple(args), kwargs


class _AttendSpy(TorchFunctionMode):
    """Records attention and group-norm calls (the ops a stage may reroute)."""

    def __init__(self, record, record_norm):
        super().__init__()
        self.record, self.record_norm = record, record_norm

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            qkv, _, _ = sdpa_arguments(args, kwargs)
            self.record(*[_info(a) for a in qkv])
        elif func is F.group_norm:
            x = kwargs.get("input", args[0] if args else None)
            groups = kwargs.get("num_groups", args[1] if len(args) > 1 else None)
            self.record_norm(_info(x), int(groups))
        return func(*args, **kwargs)


def trace_model(
    model: nn.Module,
    inputs: Any,
    streams: Sequence[Stream],
    *,
    buffers: Optional[Mapping[str, Sequence[str]]] = None,
    layouts: Optional[Any] = None,
) -> Trace:
    """Run ``model(*inputs)`` once and record every module call (see the module docstring).

    ``inputs`` is a tensor, a tuple of positional inputs, or ``(args, kwargs)`` given as a
    tuple whose last element is a dict. On the ``meta`` device, parameters are replaced by
    meta tensors for this run (``torch.func.functional_call``), so a model of any size traces
    in no memory. ``buffers``: ``{module: [attribute, ...]}`` whose reads are recorded.
    ``layouts``: the declarations, whose input layouts give the dims' sizes.
    """
    args, kwargs = split_inputs(inputs)
    calls: List[Dict[str, Any]] = []
    open_calls: Dict[str, List[Dict[str, Any]]] = {}
    attends: List[Attend] = []
    norms: List[NormCall] = []
    uses: List[Tuple[int, str, str]] = []
    clock = [0]
    sigs = {name: Args(mod) for name, mod in model.named_modules()}
    counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOPS)  # per call

    def pre(name):
        def hook(_mod, a, kw):
            sig = sigs[name]
            named: List[Tuple[Arg, TensorInfo]] = []
            for i, v in enumerate(a):
                if torch.is_tensor(v):
                    named.append((i, _info(v)))
                    if i < len(sig.positional):
                        named.append((sig.positional[i], _info(v)))
            for k, v in kw.items():
                if torch.is_tensor(v):
                    named.append((k, _info(v)))
                    if k in sig.positional:
                        named.append((sig.positional.index(k), _info(v)))
            rec = {"module": name, "start": clock[0], "end": -1, "inputs": tuple(named)}
            rec["flops"] = counter.get_total_flops()  # minus the total at its end: its own
            clock[0] += 1
            calls.append(rec)
            open_calls.setdefault(name, []).append(rec)

        return hook

    def post(name):
        def hook(_mod, _a, out):
            rec = open_calls[name].pop()
            rec["end"], rec["outs"] = clock[0], _infos(out)
            rec["flops"] = counter.get_total_flops() - rec["flops"]
            clock[0] += 1

        return hook

    def attend(q, k, v):
        attends.append(Attend(clock[0], q, k, v))
        clock[0] += 1

    def norm(x, groups):
        norms.append(NormCall(clock[0], x, groups))
        clock[0] += 1

    handles = []
    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(mod.register_forward_hook(post(name)))
    modules = dict(model.named_modules())
    try:
        on_meta = any(torch.is_tensor(a) and a.is_meta for a in (*args, *kwargs.values()))
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        if on_meta:
            state = {
                n: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
                for n, t in state.items()
            }
        watched = {}
        for owner, attrs in (buffers or {}).items():
            for attr in attrs:
                key = f"{owner}.{attr}" if owner else attr
                base = state.get(key, getattr(modules[owner], attr))
                w = base.detach().as_subclass(_Watched).requires_grad_(base.requires_grad)
                watched[key] = (owner, attr, w)
        with counter, _AttendSpy(attend, norm):
            _run(model, state, args, kwargs, watched, uses, clock, on_meta)
    finally:
        for h in handles:
            h.remove()
    recorded = tuple(Call(**{"outs": (), **c}) for c in calls)
    trace = _finish(streams, recorded, attends, uses, layouts)
    return dataclasses.replace(trace, norms=tuple(norms))


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of an attention call from its shapes (``(B, H, L, D)``)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: Attention kernels ``torch.utils.flop_counter`` has no formula for (it counts them 0): the
#: fused CPU kernel that ``scaled_dot_product_attention`` runs on real CPU tensors.
_ATTENTION_FLOPS = {
    op: _sdpa_flops
    for op in (getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None),)
    if op is not None
}


def _run(model, state, args, kwargs, watched, uses, clock, on_meta) -> None:
    """Run the forward; each watched attribute reports its reads into ``uses``."""

    def reporter(owner, attr):
        def on_use():
            uses.append((clock[0], owner, attr))
            clock[0] += 1

        return staticmethod(on_use)

    for i, (key, (owner, attr, w)) in enumerate(watched.items()):
        cls = type(f"_Watched{i}", (_Watched,), {"on_use": reporter(owner, attr)})
        state[key] = w.as_subclass(cls)
    if on_meta or watched:
        torch.func.functional_call(model, state, args, kwargs, strict=False)
    else:
        model(*args, **kwargs)


def split_inputs(inputs: Any) -> Tuple[tuple, Dict[str, Any]]:
    """``inputs`` as ``(args, kwargs)``: a tensor, a tuple, or a tuple ending in a dict."""
    if isinstance(inputs, (tuple, list)):
        inputs = tuple(inputs)
        if inputs and isinstance(inputs[-1], Mapping):
            return inputs[:-1], dict(inputs[-1])
        return inputs, {}
    return (inputs,), {}


def _finish(streams, recorded, attends, uses, decl) -> Trace:
    """Bind every dim's size from the streams' entries and the declared input layouts."""
    sizes: Dict[str, int] = {}
    itemsize = None
    for s in streams:
        first = next((c for c in recorded if c.module == s.entry), None)
        if first is None:
            raise PlanError(f"stream {s.name!r}: its entry module {s.entry!r} never ran")
        info = first.input(s.arg)
        if info is None:
            raise PlanError(f"stream {s.name!r}: input {s.arg!r} of {s.entry!r} is not a tensor")
        itemsize = itemsize or info.itemsize
    pending = []
    for c in recorded:
        for key, lay in (decl.inputs.get(c.module) or {}).items() if decl else ():
            info = c.input(key)
            if info is not None:
                pending.append((lay, info.shape, f"input {key!r} of {c.module!r}"))
        for s in streams:
            if c.module == s.entry and c.input(s.arg) is not None:
                pending.append((s.entry_layout, c.input(s.arg).shape, f"the entry of {s.name!r}"))
    _bind_all(pending, sizes, {d for s in streams for d in s.dims})
    missing = sorted({d for s in streams for d in s.dims} - set(sizes))
    if missing:
        raise PlanError(f"could not learn the sizes of dims {missing} from the recorded inputs")
    return Trace(
        tuple(streams),
        tuple(sizes.items()),
        itemsize or 4,
        recorded,
        True,
        tuple(attends),
        tuple(uses),
    )


def _bind_all(pending, sizes: Dict[str, int], keep) -> None:
    """Bind layouts until nothing new is learned (a fold may need a size bound later).

    Only the streams' dims (``keep``) are shared; other dims (a companion's D, an
    attention's head dim) belong to their own tensor."""
    from dsp.layout import LayoutError

    todo = list(pending)
    while todo:
        left = []
        for lay, shape, what in todo:
            try:
                local = dict(sizes)
                lay.bind(shape, local, what=what)
                sizes.update({d: v for d, v in local.items() if d in keep})
            except LayoutError as e:
                if "cannot tell" in str(e):
                    left.append((lay, shape, what))
                else:
                    raise PlanError(str(e)) from None
        if len(left) == len(todo):
            # folds of a module's own dims (a block's rows and columns) are learned where the
            # stage that owns them binds its input; only the streams' dims must resolve here
            left = [p for p in left if set(p[0].names) & set(keep) - set(sizes)]
            if left:
                lay, shape, what = left[0]
                try:
                    lay.bind(shape, sizes, what=what)
                except LayoutError as e:
                    raise PlanError(str(e)) from None
        todo = left


def declare_trace(
    model: nn.Module,
    streams: Sequence[Stream],
    sizes: Mapping[str, int],
    *,
    itemsize: int = 4,
    grad: bool = True,
) -> Trace:
    """A trace from declared dim sizes: registration order, full stream shapes everywhere."""
    missing = sorted({d for s in streams for d in s.dims} - set(sizes))
    if missing:
        raise PlanError(f"declared sizes lack dims {missing}; given {dict(sizes)}")
    calls: List[Call] = []
    clock = [0]

    def visit(name: str, mod: nn.Module) -> None:
        container = isinstance(mod, (nn.ModuleList, nn.ModuleDict))
        start = clock[0]
        clock[0] += 1
        index = len(calls)
        if not container:
            calls.append(Call(name, start, -1))
        for child, sub in mod.named_children():
            visit(f"{name}.{child}" if name else child, sub)
        if not container:
            calls[index] = Call(name, start, clock[0])
        clock[0] += 1

    visit("", model)
    return Trace(
        tuple(streams), tuple(dict(sizes).items()), itemsize, tuple(calls), grad, declared=True
    )
