"""Run compiled acts on tensors: unfold by layout, one collective, fold back.

:class:`Runtime` holds the group and the dims' full sizes of the current forward (learned
from the tensors the acts see; nothing about layouts). Attention acts push a
``TorchFunctionMode`` that reroutes ``scaled_dot_product_attention`` inside the module.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dsp.attention.ring import ring_attention
from dsp.comm.primitives import gather, split, switch, switch_many
from dsp.comm.seqpar import all_gather_seq, reduce_scatter_seq
from dsp.comm.shards import shard_sizes
from dsp.layout import Layout, LayoutError
from dsp.mesh import group_info, split_group
from dsp.parallelize.args import MISSING
from dsp.parallelize.compile import Act
from dsp.parallelize.norms import NormMode
from dsp.parallelize.plan import PlanError
from dsp.parallelize.trace import sdpa_arguments

__all__ = ["Runtime"]


class Runtime:
    """The group, the current forward's dim sizes, and the acts' execution.

    ``qkv_one_all_to_all``: ``heads``/``usp`` stages move q, k and v to heads in one
    all-to-all (same bytes, a third of the messages) instead of DeepSpeed's three.
    """

    qkv_one_all_to_all = False

    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group
        self.info = group_info(group)
        self.sizes: Dict[str, int] = {}
        self.inner: Dict[str, int] = {}  # full lengths of stages' own shard dims (``shard``)
        self.inner_at: Dict[str, Dict[str, int]] = {}  # ... as each act used them
        self.modes: List[Tuple[Act, TorchFunctionMode]] = []
        self.subgroups: Dict[int, tuple] = {}

    def reset(self, _mod, _args) -> None:
        """A new forward: forget sizes; undo what a forward that raised left behind."""
        self.sizes, self.inner, self.inner_at = {}, {}, {}
        while self.modes:
            self.modes.pop()[1].__exit__(None, None, None)

    # ------------------------------------------------------------------ tensors
    def bind(
        self, lay: Layout, x: torch.Tensor, shard: Optional[str], what: str, sizes: Dict[str, int]
    ) -> None:
        try:
            lay.bind(x.shape, sizes, shard=shard, n=self.info.size, rank=self.info.rank, what=what)
        except LayoutError as e:
            raise PlanError(f"rank {self.info.rank}: {e}") from None

    def run(self, act: Act, x: torch.Tensor, what: str, bias=None) -> torch.Tensor:
        """Apply ``act`` to ``x`` (see :mod:`dsp.parallelize.compile` for the ops).

        Entry splits and binds teach the forward the dims' sizes; any other act learns its
        own dims (a companion's D, an output's channels) for itself only.
        """
        lay, g, n = act.layout, self.group, self.info.size
        whole = act.op in ("split", "reducescatter", "bind")
        persist = act.op == "bind" or act.label.startswith("split ")
        sizes = self.sizes if persist else dict(self.sizes)
        src = None if whole else act.src
        # a stage's own dims (and their folds), learned at its input: what this act used in
        # this forward (a recomputation by activation checkpointing sees the same), else
        # the latest switch onto them (the enclosing stage's)
        known, seeded = self.inner_at.get(act.label) or self.inner, {}
        for d in (src, act.dst):
            fold = _fold_of(lay, d) if d is not None and d not in self.sizes else ()
            if d == src or len([f for f in fold if f not in self.sizes]) > 1:
                seeded.update({f: known[f] for f in fold if f in known})
        sizes.update(seeded)
        self.bind(lay, x, src, what, sizes)
        if seeded:
            self.inner_at.setdefault(act.label, {}).update(seeded)
        if act.op == "bind":
            return x
        if act.op == "switch" and act.dst not in self.sizes:  # remember them for the way back
            self.inner.update({d: sizes[d] for d in lay.names if d not in self.sizes})
        u = lay.unfold(x, sizes, None if whole else act.src, n, self.info.rank)
        if act.op == "split":  # whole -> shard; backward keeps this rank's part
            y = split(u, lay.index(act.dst), g, grad_mode="shard")
        elif act.op == "switch":
            y = switch(u, lay.index(act.src), lay.index(act.dst), g, src_size=sizes[act.src])
        elif act.op == "gather":  # the exit: backward slices and scales by N
            y = gather(u, lay.index(act.src), g, size=sizes[act.src], grad_scale="up")
        elif act.op == "allgather":  # operand used whole: backward reduce-scatters
            lens = shard_sizes(sizes[act.src], n)
            y = all_gather_seq(u, lay.index(act.src), lens, self.info)
        elif act.op == "reducescatter":  # partial sums -> shard; backward all-gathers
            lens = shard_sizes(sizes[act.dst], n)
            y = reduce_scatter_seq(u, lay.index(act.dst), lens, self.info)
        else:
            raise PlanError(f"unknown act {act.op!r}")
        y = lay.fold(y)
        return y + bias if bias is not None else y

    # ------------------------------------------------------------------ overlap
    def chunked(self, act: Act, inner, sig, args: tuple, kwargs: dict):
        """Run ``inner`` (the module's forward) on ``act.degree`` slices of ``act.dst``.

        Every slice's switch ``src -> dst`` is launched first; then per slice: wait for it,
        compute, launch its switch back; finally wait for the switches back and concatenate.
        Each transfer overlaps the compute of another slice, and autograd's reverse order
        gives the backward the same overlap (:mod:`dsp.comm.overlap`). The module runs on a
        shard of ``dst``, so it is independent along ``dst``: slicing it changes nothing.
        """
        from dsp.comm.overlap import drain, launch_switch, wait_switch
        from dsp.parallelize.chunks import chunks_of

        lay, src, dst = act.layout, act.src, act.dst
        n, rank = self.info.size, self.info.rank
        x = sig.get(args, kwargs, act.key)
        sizes = dict(self.sizes)
        self.bind(lay, x, src, f"{act.label} input {act.key!r}", sizes)
        u = lay.unfold(x, sizes, src, n, rank)
        i, j = lay.index(src), lay.index(dst)
        src_sizes = shard_sizes(sizes[src], n)
        pieces = chunks_of(sizes[dst], act.degree)
        if min(pieces) < n:
            raise PlanError(
                f"{act.label}: {act.degree} chunks of {dst!r} (length {sizes[dst]}) leave a "
                f"chunk of {min(pieces)} rows for {n} ranks; use at most "
                f"{max(1, sizes[dst] // n)} chunks"
            )
        handles, start = [], 0
        for p in pieces:
            part = u.narrow(j, start, p)
            handles.append(launch_switch(part, i, j, src_sizes, shard_sizes(p, n), self.info))
            start += p
        out, backs, start = act.out, [], 0
        try:
            for p, handle in zip(pieces, handles):
                a, kw = sig.set(args, kwargs, act.key, lay.fold(wait_switch(handle)))
                a, kw = self._chunk_parts(act, sig, a, kw, start, p)
                start += p
                z = inner(*a, **kw)
                osz = dict(self.sizes, **{dst: p})
                self.bind(out, z, dst, f"{act.label} output", osz)
                uz = out.unfold(z, osz, dst, n, rank)
                back = launch_switch(
                    uz, out.index(dst), out.index(src), shard_sizes(p, n), src_sizes, self.info
                )
                backs.append(back)
            parts = [wait_switch(h) for h in backs]
        except BaseException:
            # Interrupted between launches and waits: activation checkpointing's recompute
            # stops early by raising once its saved tensors are back. Every rank launched the
            # same transfers; finish them so none is left running on freed buffers.
            drain(handles + backs)
            raise
        return out.fold(torch.cat(parts, dim=out.index(dst)))

    def _chunk_parts(self, act: Act, sig, args, kwargs, start: int, length: int):
        """The companions of a chunked stage, sliced to this rank's rows of the slice
        ``[start, start + length)`` of ``act.dst`` (they arrive whole)."""
        n, rank, dst = self.info.size, self.info.rank, act.dst
        lens = shard_sizes(length, n)
        begin = start + sum(lens[:rank])

        def cut(lay: Layout, t: torch.Tensor, what: str) -> torch.Tensor:
            sizes = dict(self.sizes)
            self.bind(lay, t, None, what, sizes)
            u = lay.unfold(t, sizes, None, 1, 0)
            return lay.fold(u.narrow(lay.index(dst), begin, lens[rank]))

        for key, lay in act.parts:
            c = sig.get(args, kwargs, key)
            if c is None or c is MISSING:
                continue
            what = f"{act.label} input {key!r}"
            if isinstance(c, (tuple, list)):
                c = type(c)(cut(lay, t, f"{what}[{i}]") for i, t in enumerate(c))
            else:
                c = cut(lay, c, what)
            args, kwargs = sig.set(args, kwargs, key, c)
        return args, kwargs

    # ------------------------------------------------------------------ buffers
    def slice_buffer(self, mod: nn.Module, act: Act) -> None:
        """Shadow ``mod.<attr>`` with this rank's slice along ``act.dst`` (a view)."""
        full = getattr(mod, act.key)
        lay = act.layout
        sizes = dict(self.sizes)
        try:
            lay.bind(full.shape, sizes, what=f"{type(mod).__name__}.{act.key}")
        except LayoutError as e:
            raise PlanError(f"rank {self.info.rank}: {e}") from None
        u = lay.unfold(full, sizes, None, 1, 0)
        i = lay.index(act.dst)
        lengths = shard_sizes(u.shape[i], self.info.size)
        start = sum(lengths[: self.info.rank])
        part = lay.fold(u.narrow(i, start, lengths[self.info.rank]))
        object.__setattr__(mod, act.key, part)

    @staticmethod
    def restore_buffer(mod: nn.Module, act: Act) -> None:
        mod.__dict__.pop(act.key, None)

    # ------------------------------------------------------------------ attention
    def push_attend(self, act: Act) -> None:
        """Enter the mode that reroutes the act's attentions (or group norms)."""
        mode = NormMode(self.group, act.label) if act.op == "norm" else _AttendMode(self, act)
        mode.__enter__()
        self.modes.append((act, mode))

    def pop_attend(self, act: Act) -> None:
        if self.modes and self.modes[-1][0] is act:
            self.modes.pop()[1].__exit__(None, None, None)

    def usp_groups(self, u: int):
        """(ulysses row group, ring column group) of this rank for Ulysses degree ``u``."""
        if u not in self.subgroups:
            self.subgroups[u] = split_group(self.group, u)
        return self.subgroups[u]

    def attend(self, act: Act, func, args, kwargs):
        """One ``scaled_dot_product_attention`` call as ``act.kind`` over ``act.src``."""
        (q, k, v), args, kwargs = sdpa_arguments(args, kwargs)
        mask = kwargs.get("attn_mask", args[0] if args else None)
        if mask is not None or kwargs.get("is_causal"):
            raise PlanError(
                f"{act.label}: a {act.kind} attention over the sharded dim {act.src!r} takes no "
                "mask and is not causal"
            )
        lay, src, n = act.layout, act.src, self.info.size
        sz = dict(self.sizes)
        for name, t in (("q", q), ("k", k), ("v", v)):
            self.bind(lay, t, src, f"{act.label} attention {name}", sz)
        if act.kind == "heads":
            qkv = self._heads_in(lay, (q, k, v), src, self.group, sz[src], sz)
            out = func(*qkv, *args, **kwargs)
            return self._heads_out(lay, out, src, self.group, sz[src], sz)
        rest = {k: v for k, v in kwargs.items() if k not in ("attn_mask", "is_causal")}
        d = q.shape[-1]
        if rest.get("scale") not in (None, d**-0.5) or rest.get("dropout_p", 0.0):
            raise PlanError(f"{act.label}: ring attention uses scale 1/sqrt(D) and no dropout")
        lens = shard_sizes(sz[src], n)
        if act.kind == "usp":
            u = act.degree or 1
            row_group, ring_group = self.usp_groups(u)
            row = self.info.rank // u
            chunk = [sum(lens[j * u : (j + 1) * u]) for j in range(n // u)]
            qkv = self._heads_in(lay, (q, k, v), src, row_group, chunk[row], sz)
            out = self._ring(lay, qkv, src, ring_group, chunk, sz)
            return self._heads_out(lay, out, src, row_group, chunk[row], sz)
        return self._ring(lay, (q, k, v), src, self.group, lens, sz)

    def _heads_in(self, lay, qkv, src, group, src_size, sz):
        """q, k, v sharded on ``src`` -> sharded on heads: one switch each, or one for all.

        Switched with ``src`` moved just before ``H``: sdpa's ``(B, H, L, D)`` are views of
        the projections' ``(B, L, H, D)``, so the pack copies whole rows of heads and the
        unpack's blocks are whole rows of the output (none at B = 1), as in DeepSpeed's
        layout; the results are views in sdpa's order, as the single-device code has them.
        """
        us = [t.reshape([_dim(d, src, sz) for d in lay.dims]) for t in qkv]
        i, h = lay.index(src), lay.index("H")
        perm = list(range(len(lay.dims)))
        if i > h:
            perm.insert(h, perm.pop(i))  # (.., H, .., L, ..) -> (.., L, H, .., ..)
        us = [u.permute(perm) for u in us]
        i, h = perm.index(i), perm.index(h)
        if self.qkv_one_all_to_all:
            ys = switch_many(us, i, h, group, src_size=src_size)
        else:
            ys = [switch(u, i, h, group, src_size=src_size) for u in us]
        inv = [perm.index(d) for d in range(len(perm))]
        return [lay.fold(y.permute(inv)) for y in ys]

    def _heads_out(self, lay, out, src, group, src_len, sz):
        """Heads-sharded output (``src`` of length ``src_len``) back to ``src``-sharded."""
        shape = [-1 if d == "H" else src_len if d == src else _dim(d, None, sz) for d in lay.dims]
        u = switch(out.reshape(shape), lay.index("H"), lay.index(src), group, src_size=sz["H"])
        return lay.fold(u)

    def _ring(self, lay: Layout, qkv, src, group, block_lens, sz):
        """Ring attention over the rows of ``src``'s group (a fold of the L group)."""
        groups = lay.groups
        gl = next(i for i, g in enumerate(groups) if src in g)
        gh = next(i for i, g in enumerate(groups) if "H" in g)
        if len(groups) != 4 or gl == gh or groups[3] != ("D",) or 3 in (gl, gh):
            raise PlanError(f"ring attention needs an sdpa layout like 'B H L D', got {lay}")
        gb = next(i for i in range(3) if i not in (gl, gh))
        other = math.prod(sz[d] for d in groups[gl] if d not in (src, "1"))
        seq = [other * b for b in block_lens]
        perm = (gb, gl, gh, 3)
        q, k, v = (t.permute(perm) for t in qkv)  # (N, L_r, H, D)
        out = ring_attention(q, k, v, group, seq_sizes=seq)
        inv = [perm.index(i) for i in range(4)]
        return out.permute(inv)


def _fold_of(lay: Layout, dim: str) -> Tuple[str, ...]:
    """The named dims folded together with ``dim`` (``dim`` included)."""
    return next((tuple(d for d in g if d != "1") for g in lay.groups if dim in g), ())


def _dim(d: str, src: Optional[str], sz: Dict[str, int]) -> int:
    """Length of unfolded dim ``d``: -1 for the local ``src``, 1 for a literal ``1``."""
    if d == "1":
        return 1
    return -1 if d == src else sz[d]


class _AttendMode(TorchFunctionMode):
    """Reroutes ``scaled_dot_product_attention`` calls to :meth:`Runtime.attend`."""

    def __init__(self, rt: Runtime, act: Act):
        super().__init__()
        self.rt, self.act = rt, act

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.rt.attend(self.act, func, args, kwargs)
        return func(*args, **kwargs)
