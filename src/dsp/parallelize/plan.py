"""Plans as plain data: which stream is sharded where, and what each stage does.

A :class:`Plan` is frozen, comparable, printable (``str(plan)`` is a table) and round-trips
through a dict or JSON (:meth:`Plan.to_json`, :meth:`Plan.from_json`).

* A :class:`Stream` is one activation flowing through the model, e.g. a video's
  ``(B, T, S, C)`` or an Evoformer's MSA ``(B, M, R, Cm)`` and pair ``(B, I, J, Cz)``
  representations. It is split at the input of ``entry`` and gathered at the output of
  ``exit``; ``seq`` are the dims that may be sharded.
* A :class:`Stage` is one module and what happens around it:

  ``compute``        the module needs ``compute`` whole and runs sharded on ``shard``: if
                     the stream rests on another dim, its first input is switched to
                     ``shard`` and its output back (or, with ``out_stream``, its output is a
                     tensor of that stream sharded on ``out_shard``).
  ``relayout``       at a block boundary the stream's resting layout becomes ``shard``
                     (one switch of the block's input; later blocks receive that layout).
  ``gather_output``  the module's output is used whole inside the sharded region: it is
                     all-gathered along the stream's current layout (``shard``), and its
                     gradient reduce-scattered.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from dsp.layout import Layout

__all__ = ["KINDS", "ParamStyle", "Plan", "PlanError", "Stage", "Stream", "text_table"]

#: Stage kinds. ``compute``: switch into ``shard`` around the module; ``local``: run where the
#: stream rests (only companions, buffers); ``relayout``: a new resting layout from this block
#: on; ``gather_output``: an output used whole; ``whole``: gather the input, run, keep this
#: rank's part of the output; ``heads``: inside the module, every attention switches q/k/v
#: from the resting dim to the heads dim (Ulysses); ``ring``: its attentions run as ring
#: attention over the resting dim; ``usp``: heads over ``degree`` ranks x ring over the rest;
#: ``tp``: a tensor-parallel region (Megatron-SP: all-gather in, reduce-scatter out, weights
#: sliced as :class:`ParamStyle` says).
KINDS = ("compute", "local", "relayout", "gather_output", "whole", "heads", "ring", "usp", "tp")
#: Kinds whose hooks act on the module's inputs and output in the stream's resting layout.
RUNS = ("compute", "local", "whole", "heads", "ring", "usp", "tp")


class PlanError(ValueError):
    """A plan that cannot apply to a model, world size or input (raised before any collective)."""


def _dims(value: Any) -> Tuple[str, ...]:
    """``"T"`` or ``["T", "S"]`` -> ``("T",)`` / ``("T", "S")``."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


Arg = Union[int, str]


@dataclass(frozen=True)
class Stream:
    """An activation sharded between ``entry`` and ``exit``.

    Args:
        name: the stream's name, used by stages (``"x"``, ``"msa"``, ``"pair"``).
        dims: its named dims, e.g. ``("B", "T", "S", "C")`` (any order: the order of its
            unfolded tensors where no layout is declared).
        entry: module whose input ``arg`` is split (forward pre-hook).
        exit: module whose output (element ``out`` of a tuple output) is gathered, or whose
            input ``exit_arg`` is gathered when that is given (a pre-hook).
        shard: the dim sharded at the entry.
        seq: dims that may be sharded; default: every dim but the first and the last.
        arg: the entry's input: a position or a keyword (also at block boundaries).
        out: index of the stream in ``exit``'s tuple output; ``None``: the output itself.
        layout: the layout of the tensor at the entry and the exit (default ``dims``), e.g.
            ``"(B F) S C"`` for a model that folds frames into the batch.
        exit_arg: gather this input of ``exit`` (position or keyword) instead of its output.
    """

    name: str
    dims: Tuple[str, ...]
    entry: str
    exit: str
    shard: str
    seq: Tuple[str, ...] = ()
    arg: Arg = 0
    out: Optional[int] = None
    layout: Optional[str] = None
    exit_arg: Optional[Arg] = None

    def __post_init__(self):
        if isinstance(self.seq, str) and " " in self.seq:
            object.__setattr__(self, "seq", tuple(self.seq.split()))
        if isinstance(self.dims, str):
            if " " not in self.dims.strip():
                raise PlanError(
                    f"stream {self.name!r}: dims and seq are sequences of names such as "
                    f"('B', 'T', 'S', 'C') or a string 'B T S C', got dims={self.dims!r}"
                )
            object.__setattr__(self, "dims", tuple(self.dims.split()))
        object.__setattr__(self, "dims", _dims(self.dims))
        object.__setattr__(self, "seq", _dims(self.seq) or self.dims[1:-1])
        if self.layout is not None:
            object.__setattr__(self, "layout", str(Layout(self.layout)))
        for d, what in [(d, "seq") for d in self.seq] + [(self.shard, "entry shard")]:
            if d not in self.dims:
                raise PlanError(
                    f"stream {self.name!r} ({what}) names dim {d!r}, but the tensors of stream "
                    f"{self.name!r} have dims {self.dims}: no dim {d!r}"
                )

    def index(self, dim: str) -> int:
        """Position of ``dim`` in ``dims``."""
        return self.dims.index(dim)

    @property
    def entry_layout(self) -> Layout:
        """The layout of the tensor at the entry and the exit."""
        return Layout(self.layout or self.dims)


@dataclass(frozen=True)
class ParamStyle:
    """How a Linear's weights are sliced for a ``tp`` stage (Megatron-SP).

    ``style``: ``"column"`` (this rank's output units; fused layers repeat the unit slice in
    each of ``groups`` blocks of ``stride`` rows) or ``"row"`` (this rank's input units; the
    bias is added once, after the reduce-scatter). Units are heads of ``unit`` channels.
    """

    module: str
    style: str
    units: int
    unit: int = 1
    groups: int = 1

    def __post_init__(self):
        if self.style not in ("column", "row"):
            raise PlanError(f"{self.module!r}: style must be 'column' or 'row', got {self.style!r}")


@dataclass(frozen=True)
class Stage:
    """One module of the plan; see the module docstring and :data:`KINDS`.

    ``rest`` is the stream's resting dim when the module runs (where a switch starts and
    returns); it is filled in from the stream's entry shard when a stream has no relayout.
    ``degree``: the Ulysses degree of a ``usp`` stage; ``out_rest``: where ``out_stream``
    rests when the module writes into it (filled in likewise). ``chunks``: a ``compute``
    stage runs its module on that many slices of ``shard``, the switch of each slice
    overlapping the compute of the one before (and the switch back likewise; forward and
    backward; :func:`~dsp.parallelize.runtime.Runtime.chunked`). 1 or None: blocking.
    """

    module: str
    stream: str
    compute: Tuple[str, ...] = ()
    shard: Optional[str] = None
    kind: str = "compute"
    out_stream: Optional[str] = None
    out_shard: Optional[str] = None
    rest: Optional[str] = None
    degree: Optional[int] = None
    out_rest: Optional[str] = None
    chunks: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "compute", _dims(self.compute))
        if self.chunks is not None and (self.kind != "compute" or self.chunks < 1):
            raise PlanError(
                f"stage {self.module!r}: chunks (overlapped switches) apply to compute stages "
                f"and must be >= 1, got chunks={self.chunks} on a {self.kind} stage"
            )
        if self.kind not in KINDS:
            raise PlanError(
                f"stage {self.module!r}: kind must be one of {KINDS}, got {self.kind!r}"
            )


@dataclass(frozen=True)
class Plan:
    """Streams, stages (in forward order) and the weights sliced for ``tp`` stages."""

    streams: Tuple[Stream, ...]
    stages: Tuple[Stage, ...] = field(default=())
    params: Tuple[ParamStyle, ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "streams", tuple(self.streams))
        object.__setattr__(self, "stages", _with_rest(tuple(self.streams), tuple(self.stages)))
        object.__setattr__(self, "params", tuple(self.params))
        names = [s.name for s in self.streams]
        if len(set(names)) != len(names):
            raise PlanError(f"stream names must be unique, got {names}")

    def stream(self, name: str) -> Stream:
        for s in self.streams:
            if s.name == name:
                return s
        raise PlanError(
            f"the plan has no stream {name!r}; streams: {[s.name for s in self.streams]}"
        )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> Dict[str, Any]:
        shard = {s.name: s.shard for s in self.streams}
        moved = {st.stream for st in self.stages if st.kind == "relayout"}
        stages = []
        for st in self.stages:  # rests that follow from the entry shard are left out
            d = _compact(dataclasses.asdict(st))
            for key, name in (("rest", st.stream), ("out_rest", st.out_stream)):
                if name not in moved and d.get(key) == shard.get(name):
                    d.pop(key, None)
            bare = dataclasses.replace(st, shard=None)
            if st.kind == "gather_output" and st.shard == _gather_dim(
                bare, self.stages, shard, moved
            ):
                d.pop("shard", None)
            stages.append(d)
        out = {
            "streams": [_compact(dataclasses.asdict(s)) for s in self.streams],
            "stages": stages,
        }
        if self.params:
            out["params"] = [_compact(dataclasses.asdict(p)) for p in self.params]
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> Plan:
        try:
            streams = tuple(Stream(**s) for s in data["streams"])
            stages = tuple(Stage(**s) for s in data.get("stages", ()))
            params = tuple(ParamStyle(**p) for p in data.get("params", ()))
        except (KeyError, TypeError) as e:
            raise PlanError(f"not a plan: {e}") from None
        return cls(streams, stages, params)

    def to_json(self) -> str:
        """JSON text, one stream or stage per line."""
        d = self.to_dict()
        parts = []
        for key in [k for k in ("streams", "stages", "params") if k in d]:
            rows = ",\n".join("    " + json.dumps(v) for v in d[key])
            parts.append(f'  "{key}": [\n{rows}\n  ]' if rows else f'  "{key}": []')
        return "{\n" + ",\n".join(parts) + "\n}"

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ display
    def table(self, stage_bytes: Optional[Sequence[object]] = None) -> str:
        """The plan as text; ``stage_bytes`` adds a column (one entry per stage)."""
        lines = [
            text_table(
                ["stream", "dims", "sharded dims", "entry", "exit", "split on"],
                [
                    [s.name, ",".join(s.dims), ",".join(s.seq), s.entry, s.exit, s.shard]
                    for s in self.streams
                ],
            )
        ]
        header = ["#", "kind", "module", "stream", "computes over", "rests on", "runs on", "output"]
        rows = []
        for i, st in enumerate(self.stages):
            out = f"{st.out_stream}:{st.out_shard}" if st.out_stream else ""
            runs = {
                "whole": "whole",
                "tp": "whole (tp)",
                "heads": "heads",
                "local": st.rest,
                "ring": f"{st.rest} (ring)",
                "usp": f"heads x ring ({st.degree})",
            }
            on = runs.get(st.kind, st.shard or "")
            if st.chunks and st.chunks > 1:
                on = f"{on} ({st.chunks} chunks)"
            rows.append(
                [
                    i,
                    st.kind,
                    st.module or "<root>",
                    st.stream,
                    ",".join(st.compute),
                    st.rest or "",
                    on,
                    out,
                ]
            )
        if stage_bytes is not None:
            header.append("bytes")
            rows = [r + [b] for r, b in zip(rows, stage_bytes)]
        lines.append(text_table(header, rows))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _with_rest(streams: Tuple[Stream, ...], stages: Tuple[Stage, ...]) -> Tuple[Stage, ...]:
    """Fill ``rest`` from the entry shard for streams without relayouts."""
    shard = {s.name: s.shard for s in streams}
    moved = {st.stream for st in stages if st.kind == "relayout"}
    out = []
    for st in stages:
        if st.rest is None and st.kind in RUNS and st.stream not in moved and st.stream in shard:
            st = dataclasses.replace(st, rest=shard[st.stream])
        if st.kind == "gather_output" and st.shard is None:
            st = dataclasses.replace(st, shard=_gather_dim(st, stages, shard, moved))
        o = st.out_stream
        if st.out_rest is None and o is not None and o not in moved and o in shard:
            st = dataclasses.replace(st, out_rest=shard[o])
        out.append(st)
    return tuple(out)


def _gather_dim(st: Stage, stages, shard, moved) -> Optional[str]:
    """Where an operand's stream is sharded when it runs: the enclosing stage's shard, or the
    stream's resting dim."""
    for outer in stages:
        inside = st.module.startswith(outer.module + ".") or not outer.module
        if inside and outer.kind == "compute" and outer.stream == st.stream:
            return outer.shard
        if inside and outer.kind in ("local", "heads", "ring", "usp") and outer.stream == st.stream:
            return outer.rest
    return shard.get(st.stream) if st.stream not in moved else None


_DEFAULTS = {"kind": "compute", "arg": 0, "unit": 1, "groups": 1}


def _compact(d: Dict[str, Any]) -> Dict[str, Any]:
    """Drop defaulted fields and turn tuples into lists (stable, readable JSON)."""
    out = {}
    for k, v in d.items():
        if v is None or v == () or _DEFAULTS.get(k, object()) == v:
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def text_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned plain-text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
