"""A trace as an ordered list of the events a plan acts on, and the closed-form byte counts.

Events happen where the hooks of :func:`dsp.parallelize` act: ``entry`` (split), ``boundary``
(a block input, where a relayout may switch), ``stage``/``stage_end`` (around a module that
computes over some dims), ``check`` (a module that declares compute dims: the stream must
not be sharded on them there), ``operand`` (an output used whole: gather) and ``exit``.

Bytes are summed over all ranks (``e`` element size, ``N`` ranks, ``tensor_split`` shards):

* switch of a tensor from dim i to dim j: ``e (numel - R sum_r i_r j_r)`` each way, R the
  product of the other dims (a rank keeps the block it owns on both sides);
* all-gather: ``e numel (N - 1)``; its reduce-scatter in backward: the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Optional, Tuple

from dsp.comm.shards import shard_sizes
from dsp.parallelize.declared import Declarations, stream_of
from dsp.parallelize.plan import PlanError, Stream
from dsp.parallelize.trace import Call, TensorInfo, Trace, _pick

__all__ = ["Event", "events", "gather_bytes", "imbalance", "legal", "switch_bytes"]

_PRE = {"entry": 0, "boundary": 1, "stage": 2, "check": 3}
_POST = {"stage_end": 0, "operand": 1, "exit": 2}


@dataclass(frozen=True)
class Event:
    """One point where a plan may act. ``call`` indexes ``trace.calls``."""

    key: Tuple[int, int]
    kind: str
    module: str
    stream: str
    info: TensorInfo
    call: int
    dims: Tuple[str, ...] = ()  # check: the module's own compute dims; operand: its dims


def legal(length: int, n: int, even_only: bool = False) -> bool:
    """May a dim of ``length`` be sharded over ``n`` ranks? (No empty shards; even if asked.)"""
    return length >= n and (not even_only or length % n == 0)


def imbalance(length: int, n: int) -> Fraction:
    """Extra work of the largest shard over an even share, relative to the whole dim."""
    return Fraction(max(shard_sizes(length, n)) * n - length, max(length, 1))


def switch_bytes(info: TensorInfo, stream: Stream, src: str, dst: str, n: int) -> int:
    """Bytes all ranks send to switch ``info`` (a ``stream`` tensor) from ``src`` to ``dst``."""
    if src == dst or n == 1:
        return 0
    li, lj = info.shape[stream.index(src)], info.shape[stream.index(dst)]
    if li * lj == 0:
        return 0
    rest = info.numel // (li * lj)
    kept = rest * sum(a * b for a, b in zip(shard_sizes(li, n), shard_sizes(lj, n)))
    return info.itemsize * (info.numel - kept)


def gather_bytes(info: TensorInfo, n: int) -> int:
    """Bytes all ranks send to all-gather ``info`` (or to reduce-scatter its gradient)."""
    return info.itemsize * info.numel * (n - 1)


def events(
    trace: Trace,
    decl: Declarations,
    stages: Dict[str, Tuple[str, Optional[str]]],
    bounds: Dict[str, List[str]],
    gathers: Optional[Dict[str, str]] = None,
) -> List[Event]:
    """Events of ``trace`` inside each stream's sharded region, in forward order.

    Args:
        stages: ``{module: (stream, out_stream or None)}``: calls become ``stage`` and
            ``stage_end`` events (the output belongs to ``out_stream`` when given).
        bounds: ``{module: [stream, ...]}`` block boundaries.
        gathers: ``{module: stream}`` outputs used whole besides the declared operands.
    """
    streams = {s.name: s for s in trace.streams}
    calls = trace.calls
    live: Dict[str, Tuple[int, int]] = {}
    for s in trace.streams:
        entry = next((c for c in calls if c.module == s.entry), None)
        exit_ = next(
            (c for c in calls if c.module == s.exit and entry and c.start > entry.start), None
        )
        if entry is None or exit_ is None:
            missing = s.entry if entry is None else s.exit
            raise PlanError(f"stream {s.name!r}: module {missing!r} never ran (after its entry)")
        live[s.name] = (entry.start, exit_.end)
    out: List[Event] = []

    def add(c: Call, i: int, kind: str, stream: str, info, dims=(), shape_of=None) -> None:
        key = (c.start, _PRE[kind]) if kind in _PRE else (c.end, _POST[kind])
        lo, hi = live[stream]
        if lo <= key[0] <= hi:
            info = trace.tensor(info, streams[shape_of or stream])
            out.append(Event(key, kind, c.module, stream, info, i, tuple(dims)))

    for i, c in enumerate(calls):
        for s in trace.streams:
            if c.module == s.entry and c.start == live[s.name][0]:
                add(c, i, "entry", s.name, _pick(c.args, s.arg))
            if c.module == s.exit and c.end == live[s.name][1]:
                add(c, i, "exit", s.name, _pick(c.outs, s.out))
        for name in bounds.get(c.module, ()):
            add(c, i, "boundary", name, _pick(c.args, streams[name].arg))
        if c.module in stages:
            name, out_stream = stages[c.module]
            add(c, i, "stage", name, _pick(c.args, 0))
            add(c, i, "stage_end", name, _pick(c.outs, 0), (), out_stream)
        own = decl.compute.get(c.module)
        if own:
            add(c, i, "check", stream_of(own, trace.streams, repr(c.module)).name, None, own)
        if gathers and c.module in gathers:
            add(c, i, "operand", gathers[c.module], _pick(c.outs, 0))
        elif c.module in decl.operands:
            dims = decl.operands[c.module][1]
            s = stream_of(dims, trace.streams, f"operand {c.module!r}")
            add(c, i, "operand", s.name, _pick(c.outs, 0), dims)
    out.sort(key=lambda e: e.key)
    return out


def as_stream(ev: Event, stream: Stream) -> TensorInfo:
    """The tensor of ``ev``, checked to have one dim per dim name of ``stream``."""
    if len(ev.info.shape) != len(stream.dims):
        where = "output" if ev.kind in _POST else "first input"
        raise PlanError(
            f"the {where} of {ev.module!r} has shape {ev.info.shape}, which does not have the "
            f"{len(stream.dims)} dims {stream.dims} of stream {stream.name!r}"
        )
    return ev.info
