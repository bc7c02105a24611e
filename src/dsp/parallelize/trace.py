"""Record what a model does once, or describe it from declared sizes.

:func:`trace_model` runs the model on example inputs (tiny tensors, or tensors on the
``meta`` device: no memory, no compute) with hooks on every module, and records each call:
the shapes of its positional tensor inputs and outputs, and whether they require grad.
:func:`declare_trace` describes the same without running anything: modules are assumed to
run in registration order and every tensor at a stage to have its stream's full shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from dsp.parallelize.plan import PlanError, Stream

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
    """One call of a module: ``start`` at its pre-hook, ``end`` at its forward hook."""

    module: str
    start: int
    end: int
    args: Tuple[Optional[TensorInfo], ...] = ()
    outs: Tuple[Optional[TensorInfo], ...] = ()


@dataclass(frozen=True)
class Trace:
    """The calls of one forward, the streams' full dim sizes and the element size."""

    streams: Tuple[Stream, ...]
    sizes: Tuple[Tuple[str, int], ...]
    itemsize: int
    calls: Tuple[Call, ...]
    grad: bool = True  # default for tensors whose info was not recorded (declared traces)

    def size(self, dim: str) -> int:
        return dict(self.sizes)[dim]

    def shape(self, stream: Stream) -> Tuple[int, ...]:
        """The stream's full shape."""
        sizes = dict(self.sizes)
        return tuple(sizes[d] for d in stream.dims)

    def tensor(self, info: Optional[TensorInfo], stream: Stream) -> TensorInfo:
        """``info``, or the stream's full shape when nothing was recorded."""
        if info is not None:
            return info
        return TensorInfo(self.shape(stream), self.grad, self.itemsize)


def _pick(infos: Sequence[Optional[TensorInfo]], i: Optional[int]) -> Optional[TensorInfo]:
    i = 0 if i is None else i
    return infos[i] if 0 <= i < len(infos) else None


def _sizes(streams: Sequence[Stream], shapes: Mapping[str, Sequence[int]]) -> Dict[str, int]:
    sizes: Dict[str, int] = {}
    for s in streams:
        shape = tuple(shapes[s.name])
        if len(shape) != len(s.dims):
            raise PlanError(
                f"stream {s.name!r} names {len(s.dims)} dims {s.dims}, but the tensor at its "
                f"entry {s.entry!r} (input {s.arg}) has shape {shape} ({len(shape)} dims)"
            )
        for d, n in zip(s.dims, shape):
            if sizes.setdefault(d, n) != n:
                raise PlanError(
                    f"dim {d!r} has length {sizes[d]} in one stream and {n} in {s.name!r}"
                )
    return sizes


def trace_model(model: nn.Module, inputs: Any, streams: Sequence[Stream]) -> Trace:
    """Run ``model(*inputs)`` once and record every module call.

    ``inputs`` is a tensor or a tuple of positional inputs. If they are on the ``meta``
    device and the model is not, parameters are replaced by meta tensors for this run
    (``torch.func.functional_call``), so a model of any size traces in no memory.
    """
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    calls: List[Dict[str, Any]] = []
    open_calls: Dict[str, List[Dict[str, Any]]] = {}
    clock = [0]

    def pre(name):
        def hook(_mod, a):
            rec = {"module": name, "start": clock[0], "end": -1, "args": _infos(a), "outs": ()}
            clock[0] += 1
            calls.append(rec)
            open_calls.setdefault(name, []).append(rec)

        return hook

    def post(name):
        def hook(_mod, _a, out):
            rec = open_calls[name].pop()
            rec["end"], rec["outs"] = clock[0], _infos(out)
            clock[0] += 1

        return hook

    handles = []
    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(pre(name)))
        handles.append(mod.register_forward_hook(post(name)))
    try:
        on_meta = any(torch.is_tensor(a) and a.is_meta for a in args)
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        if on_meta and any(not t.is_meta for t in state.values()):
            meta = {
                n: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
                for n, t in state.items()
            }
            torch.func.functional_call(model, meta, args)
        else:
            model(*args)
    finally:
        for h in handles:
            h.remove()
    recorded = tuple(Call(**c) for c in calls)
    shapes, itemsize = {}, None
    for s in streams:
        first = next((c for c in recorded if c.module == s.entry), None)
        if first is None:
            raise PlanError(f"stream {s.name!r}: its entry module {s.entry!r} never ran")
        info = _pick(first.args, s.arg)
        if info is None:
            raise PlanError(f"stream {s.name!r}: input {s.arg} of {s.entry!r} is not a tensor")
        shapes[s.name] = info.shape
        itemsize = itemsize or info.itemsize
    sizes = _sizes(streams, shapes)
    return Trace(tuple(streams), tuple(sizes.items()), itemsize or 4, recorded)


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
        start = clock[0]
        clock[0] += 1
        index = len(calls)
        calls.append(Call(name, start, -1))
        for child, sub in mod.named_children():
            visit(f"{name}.{child}" if name else child, sub)
        calls[index] = Call(name, start, clock[0])
        clock[0] += 1

    visit("", model)
    shapes = {s.name: tuple(sizes[d] for d in s.dims) for s in streams}
    full = _sizes(streams, shapes)
    return Trace(tuple(streams), tuple(full.items()), itemsize, tuple(calls), grad)
