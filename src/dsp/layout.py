"""Named layouts: which named dim sits where in a tensor, with folded groups.

A :class:`Layout` describes a tensor the way the model's own code holds it, einops-style::

    Layout("B F S C")       # (B, F, S, C)
    Layout("(B F) S C")     # spatial blocks of a folded video model: frames in the batch
    Layout("(B S) F C")     # temporal blocks: patches in the batch
    Layout("B H (F S) D")   # full 3-D attention, heads second
    Layout("1 F C")         # a buffer broadcast over the batch ("1" is a dim of length 1)

The string says nothing about sharding: which dim is sharded (over which group) is state
carried beside it. A tensor whose layout has dim ``d`` sharded over ``N`` ranks holds
``torch.tensor_split`` shard ``rank`` of ``d``; a sharded dim inside a fold, ``(B F)`` with F
sharded, holds ``B x F_r`` rows in the order the model's own reshape produces.

Every conversion unfolds to one tensor dim per named dim (a view), acts on the named dim
(split, switch, gather, all-gather, reduce-scatter) and folds back, so the collectives are
exactly those of :mod:`dsp.comm` with the same bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from dsp.comm.shards import shard_sizes

__all__ = ["Layout", "LayoutError", "as_layout"]

_TOKEN = re.compile(r"\(|\)|[A-Za-z_][A-Za-z_0-9]*|1")


class LayoutError(ValueError):
    """A layout string that does not parse, or a tensor that does not fit its layout."""


@dataclass(frozen=True)
class Layout:
    """Named dims in tensor order, some folded into one tensor dim; see the module docstring."""

    groups: Tuple[Tuple[str, ...], ...]

    def __init__(self, spec: Union[str, Sequence, Layout]):
        object.__setattr__(self, "groups", _parse(spec))

    # ------------------------------------------------------------------ structure
    @property
    def dims(self) -> Tuple[str, ...]:
        """Named dims in order, folds flattened (``"1"`` entries included)."""
        return tuple(d for g in self.groups for d in g)

    @property
    def names(self) -> Tuple[str, ...]:
        """Named dims without the literal ``"1"`` entries."""
        return tuple(d for d in self.dims if d != "1")

    def __contains__(self, dim: str) -> bool:
        return dim in self.dims

    def index(self, dim: str) -> int:
        """Position of ``dim`` among the unfolded dims."""
        try:
            return self.dims.index(dim)
        except ValueError:
            raise LayoutError(f"layout {self} has no dim {dim!r}") from None

    def __str__(self) -> str:
        return " ".join(g[0] if len(g) == 1 else "(" + " ".join(g) + ")" for g in self.groups)

    def __repr__(self) -> str:
        return f"Layout({str(self)!r})"

    # ------------------------------------------------------------------ sizes
    def bind(
        self,
        shape: Sequence[int],
        sizes: Dict[str, int],
        *,
        shard: Optional[str] = None,
        n: int = 1,
        rank: int = 0,
        what: str = "tensor",
    ) -> None:
        """Learn the full length of every dim from ``shape`` (a local tensor) into ``sizes``.

        Known lengths are checked; a fold may hold at most one unknown dim, and it must
        divide. ``shard``: the dim sharded over ``n`` ranks (this rank holds its shard).
        """
        if len(shape) != len(self.groups):
            raise LayoutError(
                f"{what} has shape {tuple(shape)} ({len(shape)} dims), but its layout {self} "
                f"has {len(self.groups)}"
            )
        for group, length in zip(self.groups, shape):
            unknown = [d for d in group if d != "1" and d not in sizes]
            if len(unknown) > 1:
                raise LayoutError(
                    f"{what}: cannot tell the lengths of {unknown} apart in the fold "
                    f"({' '.join(group)}) of length {length}; declare one of them on an "
                    "earlier input (e.g. the model's own input layout)"
                )
            known = 1
            for d in group:
                if d not in unknown:
                    known *= self._local(d, sizes, shard, n, rank)
            if unknown:
                d = unknown[0]
                if known == 0 or length % known:
                    raise LayoutError(
                        f"{what}: the fold ({' '.join(group)}) has length {length}, not "
                        f"divisible by the known part {known} "
                        f"({ {k: sizes[k] for k in group if k in sizes} })"
                    )
                local = length // known
                sizes[d] = _full_from_local(local, d, shard, n, rank, what)
            elif known != length:
                full = {d: sizes.get(d, 1) for d in group}
                raise LayoutError(
                    f"{what}: the dim ({' '.join(group)}) has length {length}, expected "
                    f"{known} from {full}" + (f" with {shard!r} sharded over {n}" if shard else "")
                )

    def _local(self, d: str, sizes, shard, n, rank) -> int:
        if d == "1":
            return 1
        full = sizes[d]
        return shard_sizes(full, n)[rank] if d == shard else full

    def full_shape(self, sizes: Mapping[str, int]) -> Tuple[int, ...]:
        """The shape of the whole (unsharded) tensor."""
        return tuple(math.prod(sizes.get(d, 1) for d in g) for g in self.groups)

    def unfolded(self, sizes: Mapping[str, int]) -> Tuple[int, ...]:
        """Full length of every unfolded dim."""
        return tuple(1 if d == "1" else sizes[d] for d in self.dims)

    # ------------------------------------------------------------------ views
    def unfold(
        self, x: torch.Tensor, sizes: Mapping[str, int], shard: Optional[str], n: int, rank: int
    ) -> torch.Tensor:
        """View ``x`` with one tensor dim per named dim (local lengths)."""
        shape = [self._local(d, sizes, shard, n, rank) for d in self.dims]
        return x.reshape(shape)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`unfold`: merge each group back into one dim."""
        shape: List[int] = []
        i = 0
        for g in self.groups:
            shape.append(math.prod(x.shape[i : i + len(g)]))
            i += len(g)
        return x.reshape(shape)


def as_layout(spec: Union[str, Sequence, Layout, None]) -> Optional[Layout]:
    """``spec`` as a :class:`Layout` (``None`` stays ``None``)."""
    if spec is None or isinstance(spec, Layout):
        return spec
    return Layout(spec)


def _parse(spec) -> Tuple[Tuple[str, ...], ...]:
    if isinstance(spec, Layout):
        return spec.groups
    if not isinstance(spec, str):  # a sequence of names (or of tuples for folds)
        groups = tuple((d,) if isinstance(d, str) else tuple(d) for d in spec)
    else:
        tokens = _TOKEN.findall(spec)
        if "".join(tokens) != re.sub(r"\s+", "", spec):
            raise LayoutError(f"layout {spec!r}: only names, '1' and parentheses are allowed")
        groups_l: List[Tuple[str, ...]] = []
        current: Optional[List[str]] = None
        for t in tokens:
            if t == "(":
                if current is not None:
                    raise LayoutError(f"layout {spec!r}: nested parentheses")
                current = []
            elif t == ")":
                if not current:
                    raise LayoutError(f"layout {spec!r}: empty or unopened parentheses")
                groups_l.append(tuple(current))
                current = None
            elif current is not None:
                current.append(t)
            else:
                groups_l.append((t,))
        if current is not None:
            raise LayoutError(f"layout {spec!r}: unclosed parenthesis")
        groups = tuple(groups_l)
    names = [d for g in groups for d in g if d != "1"]
    if len(set(names)) != len(names):
        raise LayoutError(f"layout {spec!r}: a dim appears twice")
    if not groups:
        raise LayoutError(f"layout {spec!r} is empty")
    return groups


def _full_from_local(local: int, d: str, shard, n: int, rank: int, what: str) -> int:
    """Full length of ``d`` given this rank's length (only unsharded dims are learned)."""
    if d != shard or n == 1:
        return local
    raise LayoutError(
        f"{what}: the full length of the sharded dim {d!r} is unknown; it must be learned "
        "where the tensor is whole (the stream's entry or an earlier input)"
    )
