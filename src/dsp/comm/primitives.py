"""The three resharding primitives of DSP as autograd functions: split, switch, gather.

=======  ==============================  ========================  ==========================
op       forward                         backward                  bytes sent per rank (fwd)
=======  ==============================  ========================  ==========================
split    replicated -> sharded on dim    gather of the gradient    0
switch   sharded on i -> sharded on j    switch(j -> i)            local - kept part
gather   sharded on dim -> replicated    this rank's slice         local * (N - 1)
=======  ==============================  ========================  ==========================

Shards follow ``torch.tensor_split`` (:func:`dsp.shard_sizes`): no padding, empty shards
allowed. See ``docs/primitives.md`` for the gradient convention (``grad_scale``).
"""

from __future__ import annotations

import itertools
import math
import zlib
from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from dsp.comm import collectives as C
from dsp.comm.shards import normalize_dim, shard_sizes
from dsp.mesh import GroupInfo, group_info

__all__ = ["split", "gather", "switch"]

GradScale = Union[float, str]
_MAX_DIMS = 64


# ----------------------------------------------------------------------------- helpers
def _scale_value(grad_scale: GradScale, n: int) -> float:
    if grad_scale == "up":
        return float(n)
    if grad_scale == "down":
        return 1.0 / n
    if isinstance(grad_scale, str):
        raise ValueError(f"dsp: grad_scale must be a number, 'up' or 'down', got {grad_scale!r}")
    return float(grad_scale)


def _shape_vector(x: torch.Tensor) -> List[int]:
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"dsp: tensors with more than {_MAX_DIMS} dims are not supported")
    dtype_code = zlib.crc32(str(x.dtype).encode()) & 0x7FFFFFFF
    return [x.dim(), dtype_code] + list(x.shape) + [-1] * (_MAX_DIMS - x.dim())


def _validate(
    x: torch.Tensor, info: GroupInfo, sharded_dim: Optional[int], op: str, name: str = "x"
) -> List[int]:
    """Exchange shapes (metadata) and raise the same error on every rank if they disagree.

    Checks: same number of dims and dtype everywhere; every dim other than ``sharded_dim``
    has the same length on every rank. Returns the per-rank lengths of ``sharded_dim``.
    """
    rows = C.exchange_ints(_shape_vector(x), info.group, tag=f"{op}:validate")
    shapes = [tuple(r[2 : 2 + r[0]]) for r in rows]
    problems = []
    if len({r[0] for r in rows}) > 1:
        problems.append("number of dims differs")
    if len({r[1] for r in rows}) > 1:
        problems.append("dtype differs")
    if not problems:
        for d in range(rows[0][0]):
            if d != sharded_dim and len({s[d] for s in shapes}) > 1:
                problems.append(f"dim {d} differs")
    if problems:
        table = ", ".join(f"rank {i}: {tuple(s)}" for i, s in enumerate(shapes))
        raise ValueError(
            f"dsp.{op}: shapes of {name} disagree across the group ({'; '.join(problems)}): "
            f"{table}"
            + (f" (sharded dim {sharded_dim} may differ)" if sharded_dim is not None else "")
        )
    return [s[sharded_dim] for s in shapes] if sharded_dim is not None else []


def _shard_lengths(
    x: torch.Tensor,
    dim: int,
    info: GroupInfo,
    full: Optional[int],
    validate: bool,
    op: str,
    arg: str,
) -> List[int]:
    """Per-rank lengths of the sharded ``dim``: derived from ``full`` or learned (metadata)."""
    local = x.shape[dim]
    if validate:
        lengths = _validate(x, info, dim, op)
        if full is not None and lengths != shard_sizes(full, info.size):
            raise ValueError(
                f"dsp.{op}: shards of dim {dim} have lengths {lengths} across ranks, but "
                f"{arg}={full} implies {shard_sizes(full, info.size)} (torch.tensor_split)"
            )
        return lengths
    if full is not None:
        if full < 0:
            raise ValueError(f"dsp.{op}: {arg} must be >= 0, got {full}")
        lengths = shard_sizes(full, info.size)
        if lengths[info.rank] != local:
            raise ValueError(
                f"dsp.{op}: rank {info.rank} holds {local} elements of dim {dim} (shape "
                f"{tuple(x.shape)}), but {arg}={full} over {info.size} ranks gives it "
                f"{lengths[info.rank]} (shard sizes {lengths})"
            )
        return lengths
    return [row[0] for row in C.exchange_ints([local], info.group, tag=f"{op}:sizes")]


# ----------------------------------------------------------------------------- kernels
def _switch_impl(
    x: torch.Tensor,
    src: int,
    dst: int,
    src_sizes: Sequence[int],
    dst_sizes: Sequence[int],
    info: GroupInfo,
) -> torch.Tensor:
    """Sharded on ``src`` (lengths ``src_sizes``) -> sharded on ``dst`` (``dst_sizes``)."""
    n = info.size
    perm = [src, dst] + [d for d in range(x.dim()) if d not in (src, dst)]
    xp = x.permute(perm)  # (s_r, L_dst, *rest)
    s_r, rest = xp.shape[0], tuple(xp.shape[2:])
    inner = math.prod(rest)
    d_offs = [0, *itertools.accumulate(dst_sizes)]
    send_splits = [s_r * dst_sizes[j] * inner for j in range(n)]
    send = torch.empty(sum(send_splits), dtype=x.dtype, device=x.device)
    pos = 0
    for j in range(n):  # block j: (s_r, d_j, *rest), contiguous, for rank j
        send[pos : pos + send_splits[j]].view(s_r, dst_sizes[j], *rest).copy_(
            xp.narrow(1, d_offs[j], dst_sizes[j])
        )
        pos += send_splits[j]
    d_r = dst_sizes[info.rank]
    recv_splits = [src_sizes[j] * d_r * inner for j in range(n)]
    recv = C.all_to_all(send, send_splits, recv_splits, info.group, tag="switch")
    yp = recv.view(sum(src_sizes), d_r, *rest)  # (L_src, d_r, *rest), blocks in rank order
    inv = [0] * x.dim()
    for i, p in enumerate(perm):
        inv[p] = i
    return yp.permute(inv).contiguous()


def gather_dim(
    x: torch.Tensor, dim: int, sizes: Sequence[int], info: GroupInfo, tag: str = "gather"
) -> torch.Tensor:
    """Sharded on ``dim`` (lengths ``sizes``) -> full, with one all-gather (no autograd)."""
    xm = x.movedim(dim, 0).contiguous()  # (n_r, *rest)
    rest = tuple(xm.shape[1:])
    flat = C.all_gather(xm, [s * math.prod(rest) for s in sizes], info.group, tag=tag)
    return flat.view(sum(sizes), *rest).movedim(0, dim).contiguous()


def _slice(x: torch.Tensor, dim: int, sizes: Sequence[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank]).contiguous()


# ----------------------------------------------------------------------------- autograd
class _Split(torch.autograd.Function):
    """Local slice in forward, gather (all-gather) of the gradient in backward."""

    @staticmethod
    def forward(ctx, x, dim, sizes, info, scale, mode):
        ctx.dim, ctx.sizes, ctx.info, ctx.scale, ctx.mode = dim, sizes, info, scale, mode
        return _slice(x, dim, sizes, info.rank)

    @staticmethod
    def backward(ctx, g):
        if ctx.mode == "gather":
            full = gather_dim(g, ctx.dim, ctx.sizes, ctx.info)
        else:  # "shard": this rank's gradient in place, zeros elsewhere; no communication
            shape = list(g.shape)
            shape[ctx.dim] = sum(ctx.sizes)
            full = g.new_zeros(shape)
            start = sum(ctx.sizes[: ctx.info.rank])
            full.narrow(ctx.dim, start, ctx.sizes[ctx.info.rank]).copy_(g)
        if ctx.scale != 1.0:
            full = full * ctx.scale
        return full, None, None, None, None, None


class _Gather(torch.autograd.Function):
    """All-gather in forward, this rank's slice of the gradient in backward."""

    @staticmethod
    def forward(ctx, x, dim, sizes, info, scale):
        ctx.dim, ctx.sizes, ctx.info, ctx.scale = dim, sizes, info, scale
        return gather_dim(x, dim, sizes, info)

    @staticmethod
    def backward(ctx, g):
        gx = _slice(g, ctx.dim, ctx.sizes, ctx.info.rank)
        if ctx.scale != 1.0:
            gx = gx * ctx.scale
        return gx, None, None, None, None


class _Switch(torch.autograd.Function):
    """All-to-all ``src -> dst`` in forward, all-to-all ``dst -> src`` in backward."""

    @staticmethod
    def forward(ctx, x, src, dst, src_sizes, dst_sizes, info):
        ctx.args = (src, dst, src_sizes, dst_sizes, info)
        return _switch_impl(x, src, dst, src_sizes, dst_sizes, info)

    @staticmethod
    def backward(ctx, g):
        src, dst, src_sizes, dst_sizes, info = ctx.args
        return _switch_impl(g, dst, src, dst_sizes, src_sizes, info), None, None, None, None, None


# ----------------------------------------------------------------------------- public API
def split(
    x: torch.Tensor,
    dim: int,
    group: Optional[dist.ProcessGroup] = None,
    *,
    grad_scale: GradScale = 1.0,
    grad_mode: str = "gather",
    validate: bool = False,
) -> torch.Tensor:
    """Replicated -> sharded on ``dim``: this rank's ``torch.tensor_split`` slice, no comm.

    Backward (``grad_mode="gather"``, the exact adjoint): gather of the gradient, so a
    replicated input receives the full gradient on every rank. ``grad_mode="shard"``: this
    rank's gradient zero-padded to the full shape, with no communication; correct when the
    replicated input's gradients are summed or averaged over the group afterwards (as
    ``Strategy.sync_grads`` and DDP/FSDP do). Either is multiplied by ``grad_scale`` (a
    number, ``"up"`` = N or ``"down"`` = 1/N).

    Args:
        x: the full tensor, identical on every rank of ``group``.
        dim: the dim to shard (negative allowed).
        group: the process group (``None``: the world).
        grad_scale: factor applied to the gradient in backward; see docs/primitives.md.
        grad_mode: ``"gather"`` (default) or ``"shard"``, see above.
        validate: exchange shapes first and raise on every rank if they disagree.
    """
    info = group_info(group)
    d = normalize_dim(dim, x.dim())
    if grad_mode not in ("gather", "shard"):
        raise ValueError(f"dsp.split: grad_mode must be 'gather' or 'shard', got {grad_mode!r}")
    if validate:
        _validate(x, info, None, "split")
    scale = _scale_value(grad_scale, info.size)
    if info.size == 1 and scale == 1.0:
        return x
    return _Split.apply(x, d, shard_sizes(x.shape[d], info.size), info, scale, grad_mode)


def gather(
    x: torch.Tensor,
    dim: int,
    group: Optional[dist.ProcessGroup] = None,
    *,
    size: Optional[int] = None,
    grad_scale: GradScale = 1.0,
    validate: bool = False,
) -> torch.Tensor:
    """Sharded on ``dim`` -> replicated, with one all-gather.

    Args:
        x: this rank's shard.
        dim: the sharded dim (negative allowed).
        group: the process group (``None``: the world).
        size: the full length of ``dim``. Given, the shard lengths are derived and checked
            against ``torch.tensor_split``; omitted, they are learned with one small metadata
            exchange (not counted in ``bytes_sent``) and may then be any lengths.
        grad_scale: factor applied to the gradient slice in backward (``"up"`` = N).
        validate: exchange shapes first and raise on every rank if they disagree.

    Backward: this rank's slice of the incoming gradient (times ``grad_scale``).
    """
    info = group_info(group)
    d = normalize_dim(dim, x.dim())
    scale = _scale_value(grad_scale, info.size)
    if info.size == 1 and scale == 1.0 and not validate:
        if size is not None and size != x.shape[d]:
            raise ValueError(f"dsp.gather: size={size} but dim {d} has length {x.shape[d]}")
        return x
    sizes = _shard_lengths(x, d, info, size, validate, "gather", "size")
    return _Gather.apply(x, d, sizes, info, scale)


def switch(
    x: torch.Tensor,
    src_dim: int,
    dst_dim: int,
    group: Optional[dist.ProcessGroup] = None,
    *,
    src_size: Optional[int] = None,
    validate: bool = False,
) -> torch.Tensor:
    """Sharded on ``src_dim`` -> sharded on ``dst_dim`` with exactly one ``all_to_all_single``.

    Rank ``r`` sends block ``j`` of its ``dst_dim`` (``torch.tensor_split`` lengths) to rank
    ``j`` and concatenates the ``src_dim`` shards it receives, in rank order.

    Args:
        x: this rank's shard, full along ``dst_dim``.
        src_dim: the currently sharded dim. dst_dim: the dim to shard next.
        group: the process group (``None``: the world).
        src_size: the full length of ``src_dim``. Given, the switch is exactly one collective
            and this rank's length is checked; omitted, one small metadata exchange learns the
            lengths (not counted in ``bytes_sent``), and any distribution of ``src_dim`` is
            accepted.
        validate: exchange shapes first and raise on every rank if they disagree.

    Backward: ``switch(dst_dim -> src_dim)`` of the gradient.
    """
    info = group_info(group)
    src = normalize_dim(src_dim, x.dim(), "src_dim")
    dst = normalize_dim(dst_dim, x.dim(), "dst_dim")
    if src == dst:
        raise ValueError(
            f"dsp.switch: src_dim and dst_dim are the same dim ({src_dim} -> {dst_dim} on a "
            f"{x.dim()}-D tensor); a switch moves the sharding to another dim"
        )
    if info.size == 1 and not validate:
        if src_size is not None and src_size != x.shape[src]:
            raise ValueError(
                f"dsp.switch: src_size={src_size} but dim {src} has length {x.shape[src]}"
            )
        return x
    src_sizes = _shard_lengths(x, src, info, src_size, validate, "switch", "src_size")
    dst_sizes = shard_sizes(x.shape[dst], info.size)
    return _Switch.apply(x, src, dst, src_sizes, dst_sizes, info)
