"""What a model declares about its sequence dims, and the stages that follow from it.

Modules may carry three plain attributes (single-device models stay free of parallel code):

* ``compute_dim``: a dim name or a tuple of them, the sequence dims the module needs whole
  (attention over them, a position embedding along them, a sum over them);
* ``full_operands``: ``{child name: dims}``, children whose *output* the module uses whole
  along every sequence dim (e.g. the right operand of a triangle multiplication); ``dims``
  are the sequence dims of that output and identify its stream;
* ``shard_map``: ``{input dim: output dim}`` for a module whose output belongs to another
  stream (the outer-product mean turns an MSA sharded on R into a pair sharded on I).

``compute`` / ``operands`` arguments (``{module name pattern: dims}``, ``fnmatch`` patterns
matched per dotted segment) declare the same for models that carry no attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from dsp.parallelize.plan import PlanError, Stream, _dims

__all__ = ["Declarations", "read_declarations", "stream_of", "boundaries", "stage_modules"]

Patterns = Optional[Mapping[str, object]]


@dataclass
class Declarations:
    """Per module name: own compute dims, full operands (operand -> (user, dims)), shard maps."""

    compute: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    operands: Dict[str, Tuple[str, Tuple[str, ...]]] = field(default_factory=dict)
    shard_maps: Dict[str, Dict[str, str]] = field(default_factory=dict)
    subtree: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    boundaries: Dict[str, List[str]] = field(default_factory=dict)  # stream -> block modules


def matches(name: str, pattern: str) -> bool:
    """``fnmatch`` per dotted segment: ``"blocks.*.attn"`` matches ``"blocks.3.attn"``, and
    ``"blocks.*"`` matches ``"blocks.3"`` but not ``"blocks.3.attn"``."""
    parts, pats = name.split("."), pattern.split(".")
    return len(parts) == len(pats) and all(fnmatchcase(a, b) for a, b in zip(parts, pats))


def _match(name: str, patterns: Patterns) -> Optional[Tuple[str, ...]]:
    for pattern, dims in (patterns or {}).items():
        if matches(name, pattern):
            return _dims(dims)
    return None


def read_declarations(
    model: nn.Module,
    streams: Sequence[Stream] = (),
    compute: Patterns = None,
    operands: Patterns = None,
) -> Declarations:
    """Collect the declarations of every module of ``model`` (overrides win) and the block
    boundaries of ``streams``."""
    decl = Declarations()
    decl.boundaries = {s.name: boundaries(model, s) for s in streams}
    order: List[str] = []
    for name, mod in model.named_modules():
        order.append(name)
        own = _match(name, compute)
        if own is None:
            own = _dims(getattr(mod, "compute_dim", None))
        if own:
            decl.compute[name] = own
        for child, dims in (getattr(mod, "full_operands", None) or {}).items():
            decl.operands[f"{name}.{child}" if name else child] = (name, _dims(dims))
        if getattr(mod, "shard_map", None):
            decl.shard_maps[name] = dict(mod.shard_map)
    for name in order:
        dims = _match(name, operands)
        if dims is not None:
            decl.operands[name] = (name.rpartition(".")[0], dims)
    acc: Dict[str, List[str]] = {n: [] for n in order}
    for name in order:  # union of own dims over each subtree, dims in order of first use
        parts = name.split(".") if name else []
        for a in [".".join(parts[:i]) for i in range(len(parts) + 1)]:
            acc[a] += [d for d in decl.compute.get(name, ()) if d not in acc[a]]
    decl.subtree = {n: tuple(v) for n, v in acc.items()}
    return decl


def stream_of(dims: Sequence[str], streams: Sequence[Stream], what: str) -> Stream:
    """The one stream whose sequence dims contain every dim of ``dims``."""
    found = [s for s in streams if set(dims) <= set(s.seq)]
    if len(found) != 1:
        known = {s.name: s.seq for s in streams}
        raise PlanError(
            f"{what} names sequence dims {tuple(dims)}, which "
            + ("no stream has" if not found else "several streams have")
            + f" (streams and their sequence dims: {known})"
        )
    return found[0]


def boundaries(model: nn.Module, stream: Stream) -> List[str]:
    """Block boundaries: the siblings after ``stream.entry`` in its ModuleList/Sequential."""
    parent_name, _, child = stream.entry.rpartition(".")
    modules = dict(model.named_modules())
    parent = modules.get(parent_name)
    if not isinstance(parent, (nn.ModuleList, nn.Sequential)):
        return []
    names = [n for n, _ in parent.named_children()]
    if child not in names:
        return []
    prefix = f"{parent_name}." if parent_name else ""
    return [prefix + n for n in names[names.index(child) + 1 :]]


def stage_modules(
    model: nn.Module, decl: Declarations, streams: Sequence[Stream]
) -> Dict[str, Tuple[str, Tuple[str, ...]]]:
    """Outermost modules that compute over a proper subset of one stream's sequence dims
    and do not contain a stream's entry or exit.

    Returns ``{module name: (stream name, compute dims)}`` in registration order. A module
    whose subtree spans several streams, or every sequence dim of one, is searched further;
    if it computes over every sequence dim itself, no dim is left to shard: error.
    """
    out: Dict[str, Tuple[str, Tuple[str, ...]]] = {}
    around = {  # modules that contain an entry or exit: the sharded region is inside them
        ".".join(m.split(".")[:i])
        for s in streams
        for m in (s.entry, s.exit)
        for i in range(len(m.split(".")))
    }
    for name, dims in decl.compute.items():  # name the module if a dim belongs to no stream
        for d in dims:
            stream_of((d,), streams, f"module {name!r} (compute_dim)")

    def visit(name: str, mod: nn.Module) -> None:
        dims = decl.subtree.get(name, ())
        if not dims:
            return
        owners = {stream_of((d,), streams, f"module {name!r}").name for d in dims}
        if len(owners) == 1 and name not in around:
            stream = next(s for s in streams if s.name in owners)
            if set(stream.seq) - set(dims):
                out[name] = (stream.name, tuple(d for d in stream.seq if d in dims))
                return
        if decl.compute.get(name):  # its own code needs every dim: nothing can be sharded
            raise PlanError(every_dim_message(name, dims, streams))
        children = list(mod.named_children())
        for c, child in children:
            visit(_child(name, c), child)

    visit("", model)
    return out


def _child(name: str, child: str) -> str:
    return f"{name}.{child}" if name else child


def every_dim_message(name: str, dims: Sequence[str], streams: Sequence[Stream]) -> str:
    seqs = {s.name: s.seq for s in streams}
    return (
        f"module {name or '<root>'!r} computes over {tuple(dims)}: every sequence dim of its "
        f"stream, or dims of several streams (sequence dims per stream: {seqs}), so no dim is "
        "left to shard while it runs. "
        "Split it into modules that each compute over fewer dims, gather the stream around "
        "it (end the stream before it), or use another strategy (ring, ulysses)."
    )
