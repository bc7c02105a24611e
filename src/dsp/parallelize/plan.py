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
from typing import Any, Dict, Optional, Sequence, Tuple

__all__ = ["KINDS", "Plan", "PlanError", "Stage", "Stream", "text_table"]

KINDS = ("compute", "relayout", "gather_output")


class PlanError(ValueError):
    """A plan that cannot apply to a model, world size or input (raised before any collective)."""


def _dims(value: Any) -> Tuple[str, ...]:
    """``"T"`` or ``["T", "S"]`` -> ``("T",)`` / ``("T", "S")``."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class Stream:
    """An activation sharded between ``entry`` and ``exit``.

    Args:
        name: the stream's name, used by stages (``"x"``, ``"msa"``, ``"pair"``).
        dims: one name per tensor dim, e.g. ``("B", "T", "S", "C")``.
        entry: module whose positional input ``arg`` is split (forward pre-hook).
        exit: module whose output (element ``out`` of a tuple output) is gathered.
        shard: the dim sharded at the entry.
        seq: dims that may be sharded; default: every dim but the first and the last
            (batch first, channels last).
        arg: position of the stream in ``entry``'s (and every block boundary's) inputs.
        out: index of the stream in ``exit``'s tuple output; ``None``: the output itself.
    """

    name: str
    dims: Tuple[str, ...]
    entry: str
    exit: str
    shard: str
    seq: Tuple[str, ...] = ()
    arg: int = 0
    out: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.dims, str) or isinstance(self.seq, str):
            raise PlanError(
                f"stream {self.name!r}: dims and seq are sequences of names such as "
                f"('B', 'T', 'S', 'C'), got dims={self.dims!r}, seq={self.seq!r}"
            )
        object.__setattr__(self, "dims", _dims(self.dims))
        object.__setattr__(self, "seq", _dims(self.seq) or self.dims[1:-1])

    def index(self, dim: str) -> int:
        """Tensor position of ``dim``."""
        return self.dims.index(dim)


@dataclass(frozen=True)
class Stage:
    """One module of the plan; see the module docstring for the three kinds."""

    module: str
    stream: str
    compute: Tuple[str, ...] = ()
    shard: Optional[str] = None
    kind: str = "compute"
    out_stream: Optional[str] = None
    out_shard: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "compute", _dims(self.compute))
        if self.kind not in KINDS:
            raise PlanError(
                f"stage {self.module!r}: kind must be one of {KINDS}, got {self.kind!r}"
            )


@dataclass(frozen=True)
class Plan:
    """Streams and stages (stages in forward order)."""

    streams: Tuple[Stream, ...]
    stages: Tuple[Stage, ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "streams", tuple(self.streams))
        object.__setattr__(self, "stages", tuple(self.stages))
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
        return {
            "streams": [_compact(dataclasses.asdict(s)) for s in self.streams],
            "stages": [_compact(dataclasses.asdict(s)) for s in self.stages],
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> Plan:
        try:
            streams = tuple(Stream(**s) for s in data["streams"])
            stages = tuple(Stage(**s) for s in data.get("stages", ()))
        except (KeyError, TypeError) as e:
            raise PlanError(f"not a plan: {e}") from None
        return cls(streams, stages)

    def to_json(self) -> str:
        """JSON text, one stream or stage per line."""
        d = self.to_dict()
        parts = []
        for key in ("streams", "stages"):
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
        header = ["#", "kind", "module", "stream", "computes over", "sharded on", "output"]
        rows = []
        for i, st in enumerate(self.stages):
            out = f"{st.out_stream}:{st.out_shard}" if st.out_stream else ""
            compute = ",".join(st.compute) if st.kind == "compute" else ""
            rows.append([i, st.kind, st.module, st.stream, compute, st.shard or "", out])
        if stage_bytes is not None:
            header.append("bytes")
            rows = [r + [b] for r, b in zip(rows, stage_bytes)]
        lines.append(text_table(header, rows))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _compact(d: Dict[str, Any]) -> Dict[str, Any]:
    """Drop defaulted fields and turn tuples into lists (stable, readable JSON)."""
    out = {}
    for k, v in d.items():
        if v is None or v == () or (k == "kind" and v == "compute") or (k == "arg" and v == 0):
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
