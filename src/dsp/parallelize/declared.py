"""What a model declares about its sequence dims, and the stages that follow from it.

Everything is data about the model's own code; nothing in the model changes. Per module
(a name, or an ``fnmatch`` pattern matched per dotted segment, in ``declare=``; or the same
dict as a ``dsp_declare`` attribute on the module):

* ``compute``: the sequence dims the module needs whole (attention over them, a sum over
  them, a convolution across them). Also the plain attribute ``compute_dim``.
* ``inputs``: ``{argument: layout}`` for its inputs, by position or keyword, e.g.
  ``{"hidden_states": "(B S) F C", "timestep": "(B S) D"}``. An input whose layout holds
  every sequence dim of a stream is that stream (it arrives sharded); the others are
  *companions*, which arrive whole and are sliced to the shard the module runs on
  (per-row timesteps, per-frame text, masks, rotary tables). Default: input 0 is the stream.
* ``output``: its output's layout (or ``{index: layout}`` for a tuple output); default: the
  layout of its first stream input.
* ``sdpa``: the layout of q, k, v and the output of the
  ``torch.nn.functional.scaled_dot_product_attention`` calls inside it, e.g.
  ``"(B S) H F D"`` (it enables ``heads``, ``ring`` and ``usp`` stages).
* ``buffers``: ``{attribute: layout}`` for parameters or buffers of this module that its own
  forward uses between child modules (e.g. a position table ``"1 F C"`` a parent adds);
  they are sliced to the current shard while it runs, with the exact gradient.
* ``shard``: dims of the module's stream input that are not sequence dims of the stream
  (their length may differ from call to call, like a UNet's rows at each resolution) and
  that it may run sharded on: the stream switches onto one at the module's input and back
  at its output, e.g. ``"Hm"`` for a motion module on ``"(B F) Cm Hm Wm"``.
* ``norm``: the layout of the input of the ``torch.nn.functional.group_norm`` calls inside
  it, e.g. ``"B Cm F Hm Wm"``. While it runs sharded on a dim its norms reduce over (any
  dim but the first), their statistics are summed over the ranks (:mod:`.norms`).
* ``operands``: ``{child: dims}``: children whose output the module uses whole (also the
  attribute ``full_operands``); ``shard_map``: ``{input dim: output dim}`` for a module whose
  output belongs to another stream.

``compute`` / ``operands`` arguments (``{pattern: dims}``) remain as shorthands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from dsp.layout import Layout, LayoutError
from dsp.parallelize.plan import Arg, PlanError, Stream, _dims

__all__ = [
    "Declarations",
    "boundaries",
    "read_declarations",
    "stage_modules",
    "stream_of",
]

Patterns = Optional[Mapping[str, object]]
KEYS = (
    "compute",
    "inputs",
    "output",
    "sdpa",
    "buffers",
    "operands",
    "shard_map",
    "shard",
    "norm",
)


@dataclass
class Declarations:
    """Per module name: what it computes over, its argument layouts, and more (see above)."""

    compute: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    operands: Dict[str, Tuple[str, Tuple[str, ...]]] = field(default_factory=dict)
    shard_maps: Dict[str, Dict[str, str]] = field(default_factory=dict)
    inputs: Dict[str, Dict[Arg, Layout]] = field(default_factory=dict)
    outputs: Dict[str, Dict[Optional[int], Layout]] = field(default_factory=dict)
    sdpa: Dict[str, Layout] = field(default_factory=dict)
    buffers: Dict[str, Dict[str, Layout]] = field(default_factory=dict)
    inner: Dict[str, Tuple[str, ...]] = field(default_factory=dict)  # module -> own shard dims
    own_compute: Dict[str, Tuple[str, ...]] = field(default_factory=dict)  # of an ancestor's
    norms: Dict[str, Layout] = field(default_factory=dict)
    subtree: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    boundaries: Dict[str, List[str]] = field(default_factory=dict)  # stream -> block modules

    def input_layouts(self, module: str, stream: Stream) -> Dict[Arg, Layout]:
        """The module's declared inputs, or ``{stream.arg or 0: stream layout}``."""
        return self.inputs.get(module) or {0: stream.entry_layout}

    def split_inputs(self, module: str, stream: Stream):
        """``(stream inputs, companions)`` of ``module``: ``{arg: layout}`` each.

        A stream input has as many named dims as the stream, among them every sequence dim
        and the first (batch) dim; its other dims may be named otherwise (a UNet's channels
        and spatial dims at each resolution). Anything else is a companion: a table without
        the batch (rotary ``"1 (F S) 1 D"``), a per-frame embedding ``"(B F) D"``."""
        main, extra = {}, {}
        need = set(stream.seq) | {stream.dims[0]}
        for arg, lay in self.input_layouts(module, stream).items():
            carries = need <= set(lay.names) and len(lay.names) == len(stream.dims)
            (main if carries else extra)[arg] = lay
        return main, extra

    def output_layouts(self, module: str, stream: Stream) -> Dict[Optional[int], Layout]:
        """The module's declared output layouts, or its first stream input's at ``None``."""
        if module in self.outputs:
            return self.outputs[module]
        main, _ = self.split_inputs(module, stream)
        return {None: next(iter(main.values()), stream.entry_layout)}


def matches(name: str, pattern: str) -> bool:
    """``fnmatch`` per dotted segment: ``"blocks.*.attn"`` matches ``"blocks.3.attn"``, and
    ``"blocks.*"`` matches ``"blocks.3"`` but not ``"blocks.3.attn"``."""
    if pattern == "":
        return name == ""
    parts, pats = name.split("."), pattern.split(".")
    return len(parts) == len(pats) and all(fnmatchcase(a, b) for a, b in zip(parts, pats))


def _match(name: str, patterns: Patterns) -> Optional[Any]:
    for pattern, value in (patterns or {}).items():
        if matches(name, pattern):
            return value
    return None


def _layout(spec, what: str) -> Layout:
    try:
        return Layout(spec)
    except LayoutError as e:
        raise PlanError(f"{what}: {e}") from None


def _read_entry(decl: Declarations, name: str, entry: Mapping[str, Any]) -> None:
    """One module's declaration dict into ``decl``."""
    unknown = set(entry) - set(KEYS)
    if unknown:
        raise PlanError(
            f"the declaration of module {name!r} has unknown keys {sorted(unknown)}; "
            f"known: {list(KEYS)}"
        )
    if "compute" in entry:
        dims = entry["compute"]
        dims = _dims(dims.split() if isinstance(dims, str) else dims)
        if dims:
            decl.compute[name] = dims
        else:
            decl.compute.pop(name, None)
    if entry.get("inputs"):
        decl.inputs[name] = {
            k: _layout(v, f"module {name!r} input {k!r}") for k, v in entry["inputs"].items()
        }
    out = entry.get("output")
    if out is not None:
        outs = out if isinstance(out, Mapping) else {None: out}
        decl.outputs[name] = {k: _layout(v, f"module {name!r} output") for k, v in outs.items()}
    if entry.get("sdpa"):
        decl.sdpa[name] = _layout(entry["sdpa"], f"module {name!r} sdpa")
    if entry.get("buffers"):
        decl.buffers[name] = {
            k: _layout(v, f"module {name!r} buffer {k!r}") for k, v in entry["buffers"].items()
        }
    if entry.get("shard"):
        dims = entry["shard"]
        decl.inner[name] = _dims(dims.split() if isinstance(dims, str) else dims)
    if entry.get("norm"):
        decl.norms[name] = _layout(entry["norm"], f"module {name!r} norm")
    for child, dims in (entry.get("operands") or {}).items():
        decl.operands[f"{name}.{child}" if name else child] = (name, _dims(dims))
    if entry.get("shard_map"):
        decl.shard_maps[name] = dict(entry["shard_map"])


def read_declarations(
    model: nn.Module,
    streams: Sequence[Stream] = (),
    compute: Patterns = None,
    operands: Patterns = None,
    declare: Patterns = None,
) -> Declarations:
    """Collect the declarations of every module of ``model`` (arguments win over attributes)
    and the block boundaries of ``streams``."""
    decl = Declarations()
    decl.boundaries = {s.name: boundaries(model, s) for s in streams}
    order: List[str] = []
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        order.append(name)
        own = _dims(getattr(mod, "compute_dim", None))
        if own:
            decl.compute[name] = own
        for child, dims in (getattr(mod, "full_operands", None) or {}).items():
            decl.operands[f"{name}.{child}" if name else child] = (name, _dims(dims))
        if getattr(mod, "shard_map", None):
            decl.shard_maps[name] = dict(mod.shard_map)
        attr = getattr(mod, "dsp_declare", None)
        if attr:
            _read_entry(decl, name, attr)
        entry = _match(name, declare)
        if entry is not None:
            _read_entry(decl, name, entry)
        own = _match(name, compute)
        if own is not None:
            _read_entry(decl, name, {"compute": own})
    for pattern in list(declare or {}) + list(compute or {}) + list(operands or {}):
        if not any(matches(n, pattern) for n in order):
            raise PlanError(_no_module(model, pattern, order))
    for name in order:
        dims = _match(name, operands)
        if dims is not None:
            decl.operands[name] = (name.rpartition(".")[0], _dims(dims))
    _check_arguments(decl, modules)
    for name, dims in decl.inner.items():
        names = {d for lay in (decl.inputs.get(name) or {}).values() for d in lay.names}
        lost = [d for d in dims if d not in names]
        if lost:
            raise PlanError(
                f"module {name or '<root>'!r} may run sharded on {list(lost)} ('shard'), but no "
                f"declared input layout of it has that dim (inputs: "
                f"{ {k: str(v) for k, v in (decl.inputs.get(name) or {}).items()} })"
            )
    for name, bufs in decl.buffers.items():
        for b in bufs:
            if not hasattr(modules[name], b):
                raise PlanError(f"module {name or '<root>'!r} has no parameter or buffer {b!r}")
    _own_compute(decl, streams)
    acc: Dict[str, List[str]] = {n: [] for n in order}
    for name in order:  # union of own dims over each subtree, dims in order of first use
        parts = name.split(".") if name else []
        for a in [".".join(parts[:i]) for i in range(len(parts) + 1)]:
            acc[a] += [d for d in decl.compute.get(name, ()) if d not in acc[a]]
    decl.subtree = {n: tuple(v) for n, v in acc.items()}
    return decl


def _own_compute(decl: Declarations, streams: Sequence[Stream]) -> None:
    """Move compute dims that are an ancestor's own shard dims (``shard``) out of
    ``decl.compute`` into ``decl.own_compute``: a child of a module that may run on its rows
    (``Ha``) and that needs those rows whole (a spatial attention inside it) is a *nested*
    stage, planned with its ancestor."""
    seq = {d for s in streams for d in s.seq}
    for name, dims in list(decl.compute.items()):
        own = [d for d in dims if d not in seq]
        if not own:
            continue
        parts = name.split(".")
        ancestors = {".".join(parts[:i]) for i in range(len(parts))}
        offered = {d for a in ancestors for d in decl.inner.get(a, ())}
        lost = [d for d in own if d not in offered]
        if lost:
            continue  # stage_modules names the module and the dims no stream has
        decl.own_compute[name] = tuple(own)
        rest = tuple(d for d in dims if d in seq)
        if rest:
            decl.compute[name] = rest
        else:
            del decl.compute[name]


def _check_arguments(decl: Declarations, modules) -> None:
    """Every declared input must be an argument the module's forward takes."""
    from dsp.parallelize.args import Args

    for module, inputs in decl.inputs.items():
        sig = Args(modules[module])
        for key in inputs:
            if not sig.valid(key):
                raise PlanError(
                    f"module {module or '<root>'!r} ({type(modules[module]).__name__}) declares "
                    f"input {key!r}, but its forward takes {sig.positional}"
                    + (" and **kwargs" if sig.varkw else "")
                )


def _no_module(model: nn.Module, pattern: str, names: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(pattern, [n for n in names if n], n=3)
    hint = f"; did you mean {close}?" if close else ""
    kind = type(model).__name__
    return f"the declarations name {pattern!r}, which matches no module of {kind}{hint}"


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
    """Block boundaries: the other children of the lists (``ModuleList``/``Sequential``) that
    sit beside the entry's list, the entry's own list included (Latte keeps spatial and
    temporal blocks in two lists and calls them in turn)."""
    parent_name, _, _ = stream.entry.rpartition(".")
    modules = dict(model.named_modules())
    if not isinstance(modules.get(parent_name), (nn.ModuleList, nn.Sequential)):
        return []
    grand, _, _ = parent_name.rpartition(".")
    lists = [
        n
        for n, m in modules.items()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and n and n.rpartition(".")[0] == grand
    ]
    out = []
    for lst in lists:
        out += [f"{lst}.{c}" for c, _ in modules[lst].named_children()]
    return [b for b in out if b != stream.entry]


def stage_modules(
    model: nn.Module,
    decl: Declarations,
    streams: Sequence[Stream],
    called: Optional[set] = None,
) -> Dict[str, Tuple[str, Tuple[str, ...]]]:
    """Outermost called modules that compute over sequence dims of one stream and do not
    contain a stream's entry or exit.

    Returns ``{module name: (stream name, compute dims)}`` in registration order. A module
    whose subtree spans several streams, or every sequence dim of one, is searched further;
    if it computes over every sequence dim itself, it is a stage that cannot be switched
    (``whole``, ``heads`` or ``ring``). ``called``: the modules a recording saw run
    (containers such as ``ModuleList`` are never called and are searched through).
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
        runs = called is None or name in called
        owners = {stream_of((d,), streams, f"module {name!r}").name for d in dims}
        if len(owners) == 1 and name not in around and runs:
            stream = next(s for s in streams if s.name in owners)
            own = decl.compute.get(name, ())
            if set(stream.seq) - set(dims) or set(stream.seq) <= set(own):
                out[name] = (stream.name, tuple(d for d in stream.seq if d in dims))
                return
        if decl.compute.get(name) and runs and name not in around and len(owners) > 1:
            raise PlanError(every_dim_message(name, dims, streams))
        for c, child in mod.named_children():
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
