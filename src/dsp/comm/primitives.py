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

import functools
import itertools
import math
import zlib
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from dsp.comm import collectives as C
from dsp.comm.shards import normalize_dim, shard_sizes
from dsp.mesh import GroupInfo, group_info

__all__ = ["split", "gather", "switch", "switch_many"]

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
def _block_shape(shape: Sequence[int], dims: Sequence[int], lengths: Sequence[int]) -> List[int]:
    out = list(shape)
    for d, n in zip(dims, lengths):
        out[d] = n
    return out


@functools.lru_cache(maxsize=1024)
def _split_view(
    shape: Tuple[int, ...], stride: Tuple[int, ...], dim: int, n: int
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Size and stride of ``unflatten(dim, (n, shape[dim] // n)).movedim(dim, 0)`` of a tensor
    of this shape and stride: the N blocks of ``dim`` moved to the front, one view."""
    d = shape[dim] // n
    size = (n, *shape[:dim], d, *shape[dim + 1 :])  # tuples: the cache hands out the same ones
    return size, (stride[dim] * d, *stride[:dim], stride[dim], *stride[dim + 1 :])


@functools.lru_cache(maxsize=1024)
def _joined_view(
    shape: Tuple[int, ...], dim: int, n: int
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Size and stride of ``view(n, *block).movedim(0, dim)`` of a contiguous buffer of N
    blocks, each ``shape`` with ``dim`` cut N-fold: ``(.., N, s, ..)``, one view."""
    block = list(shape)
    block[dim] //= n
    stride = [1] * len(block)
    for i in range(len(block) - 2, -1, -1):
        stride[i] = stride[i + 1] * block[i + 1]
    size = (*block[:dim], n, *block[dim:])
    return size, (*stride[:dim], stride[0] * block[0], *stride[dim:])


def _even(shape, xs, sizes) -> bool:
    """Whether every tensor has ``shape`` and one split size (all blocks alike)."""
    same = all(tuple(x if isinstance(x, (list, tuple)) else x.shape) == tuple(shape) for x in xs)
    return same and all(len(set(sz)) == 1 for sz in sizes) and len({sz[0] for sz in sizes}) == 1


def _pack(
    xs: Sequence[torch.Tensor], dst: int, dst_sizes: Sequence[Sequence[int]], n: int
) -> Tuple[torch.Tensor, List[int]]:
    """The send buffer of a switch: for each rank ``j``, every tensor's block ``j`` of ``dst``.

    Blocks keep the tensor's own dim order (``x.narrow(dst, ...)``). One copy (one strided
    copy per tensor when all blocks are alike, else one per block); none when a
    single contiguous tensor has only length-1 dims before ``dst`` (its blocks then follow
    each other in memory already, and the tensor itself is the send buffer).
    """
    if len(xs) == 1 and xs[0].is_contiguous() and math.prod(xs[0].shape[:dst]) == 1:
        x = xs[0]
        inner = math.prod(_block_shape(x.shape, [dst], [1]))  # elements per dst row
        return x.reshape(-1), [d * inner for d in dst_sizes[0]]
    if len(xs) == 1 and dst_sizes[0].count(dst_sizes[0][0]) == n:
        # (.., N d, ..) -> (N, .., d, ..) as one view (its strides worked out once per
        # layout), then one copy
        x = xs[0]
        size, stride = _split_view(tuple(x.shape), x.stride(), dst, n)
        send = x.as_strided(size, stride).contiguous()  # as_strided keeps x's storage offset
        return send.view(-1), [x.numel() // n] * n
    if _even(xs[0].shape, xs, dst_sizes):  # one strided copy per tensor into (N, T, *block)
        d = dst_sizes[0][0]
        block = _block_shape(xs[0].shape, [dst], [d])
        send = torch.empty(n * len(xs) * math.prod(block), dtype=xs[0].dtype, device=xs[0].device)
        view = send.view(n, len(xs), *block)
        for t, x in enumerate(xs):  # (..., N * d, ...) -> (N, ..., d, ...)
            view[:, t].copy_(x.unflatten(dst, (n, d)).movedim(dst, 0))
        return send, [len(xs) * math.prod(block)] * n
    offs = [[0, *itertools.accumulate(sz)] for sz in dst_sizes]
    blocks = [
        [_block_shape(x.shape, [dst], [dst_sizes[t][j]]) for j in range(n)]
        for t, x in enumerate(xs)
    ]
    send_splits = [sum(math.prod(blocks[t][j]) for t in range(len(xs))) for j in range(n)]
    send = torch.empty(sum(send_splits), dtype=xs[0].dtype, device=xs[0].device)
    pos = 0
    for j in range(n):  # rank j's part: [x_0 block j, x_1 block j, ...], each contiguous
        for t, x in enumerate(xs):
            numel = math.prod(blocks[t][j])
            send[pos : pos + numel].view(blocks[t][j]).copy_(
                x.narrow(dst, offs[t][j], dst_sizes[t][j])
            )
            pos += numel
    return send, send_splits


def _unpack(
    recv: torch.Tensor,
    shapes: Sequence[Sequence[int]],
    src: int,
    src_sizes: Sequence[Sequence[int]],
    n: int,
) -> List[torch.Tensor]:
    """Outputs of a switch from its receive buffer ``recv`` (1-D and contiguous, as the
    all-to-all writes it: rank order, tensor order within a rank).

    Output ``t`` concatenates along ``src`` the blocks every rank sent of it: one copy (one
    strided copy per tensor when all blocks are alike, else ``torch.cat``); none for a single
    tensor with only length-1 dims before ``src`` (the blocks then are the output's memory in
    order, and the output is a view of ``recv``).
    """
    if len(shapes) == 1 and math.prod(shapes[0][:src]) == 1:
        return [recv.view(list(shapes[0]))]
    if len(shapes) == 1 and src_sizes[0].count(src_sizes[0][0]) == n and recv.is_contiguous():
        # (N, .., s, ..) -> (.., N, s, ..) as one view of the (contiguous) receive buffer,
        # then (.., N s, ..): one copy
        size, stride = _joined_view(tuple(shapes[0]), src, n)
        return [recv.as_strided(size, stride).reshape(shapes[0])]
    if _even(shapes[0], shapes, src_sizes):  # one strided copy per tensor from (N, T, *block)
        block = _block_shape(shapes[0], [src], [src_sizes[0][0]])
        view = recv.view(n, len(shapes), *block)
        # (N, ..., s, ...) -> (..., N, s, ...) -> (..., N * s, ...): a copy (the dims moved)
        return [view[:, t].movedim(0, src).reshape(list(shapes[0])) for t in range(len(shapes))]
    parts: List[List[torch.Tensor]] = [[] for _ in shapes]
    pos = 0
    for i in range(n):
        for t, shape in enumerate(shapes):
            block = _block_shape(shape, [src], [src_sizes[t][i]])
            numel = math.prod(block)
            parts[t].append(recv[pos : pos + numel].view(block))
            pos += numel
    return [torch.cat(p, dim=src) for p in parts]


def _switch_many(
    xs: Sequence[torch.Tensor],
    src: int,
    dst: int,
    src_sizes: Sequence[Sequence[int]],
    dst_sizes: Sequence[Sequence[int]],
    info: GroupInfo,
) -> List[torch.Tensor]:
    """Tensors sharded on ``src`` (tensor ``t``: lengths ``src_sizes[t]``) -> sharded on
    ``dst`` (``dst_sizes[t]``), all in one all-to-all: one copy to pack, one to unpack."""
    n, r = info.size, info.rank
    send, send_splits = _pack(xs, dst, dst_sizes, n)
    shapes = [
        _block_shape(x.shape, [src, dst], [sum(src_sizes[t]), dst_sizes[t][r]])
        for t, x in enumerate(xs)
    ]
    inner = [math.prod(_block_shape(s, [src], [1])) for s in shapes]  # elements per src row
    recv_splits = [sum(src_sizes[t][i] * inner[t] for t in range(len(xs))) for i in range(n)]
    recv = C.all_to_all(send, send_splits, recv_splits, info.group, tag="switch")
    return _unpack(recv, shapes, src, src_sizes, n)


def _switch_impl(
    x: torch.Tensor,
    src: int,
    dst: int,
    src_sizes: Sequence[int],
    dst_sizes: Sequence[int],
    info: GroupInfo,
) -> torch.Tensor:
    """Sharded on ``src`` (lengths ``src_sizes``) -> sharded on ``dst`` (``dst_sizes``)."""
    return _switch_many([x], src, dst, [src_sizes], [dst_sizes], info)[0]


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


class _SwitchMany(torch.autograd.Function):
    """Several tensors ``src -> dst`` in one all-to-all; backward: ``dst -> src``, one too."""

    @staticmethod
    def forward(ctx, src, dst, src_sizes, dst_sizes, info, *xs):
        ctx.args = (src, dst, src_sizes, dst_sizes, info)
        return tuple(_switch_many(xs, src, dst, src_sizes, dst_sizes, info))

    @staticmethod
    def backward(ctx, *gs):
        src, dst, src_sizes, dst_sizes, info = ctx.args
        gx = _switch_many([g.contiguous() for g in gs], dst, src, dst_sizes, src_sizes, info)
        return (None, None, None, None, None, *gx)


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


def switch_many(
    xs: Sequence[torch.Tensor],
    src_dim: int,
    dst_dim: int,
    group: Optional[dist.ProcessGroup] = None,
    *,
    src_size: Union[int, Sequence[int], None] = None,
) -> List[torch.Tensor]:
    """:func:`switch` of several tensors (e.g. q, k, v) in one ``all_to_all_single``.

    Each tensor moves exactly the bytes its own :func:`switch` would (same blocks, one
    message per peer instead of one per tensor and peer); results equal per-tensor switches
    exactly. The tensors share ``src_dim``/``dst_dim`` and a dtype; other dims may differ.

    Args:
        xs: this rank's shards, each full along ``dst_dim``.
        src_dim, dst_dim, group: as for :func:`switch`.
        src_size: the full length of ``src_dim``, one for all or one per tensor; omitted,
            one small metadata exchange learns every tensor's lengths.

    Backward: one ``switch_many(dst_dim -> src_dim)`` of the gradients.
    """
    xs = list(xs)
    if not xs:
        return []
    if len({(x.dtype, x.device, x.dim()) for x in xs}) > 1:
        raise ValueError(
            "dsp.switch_many: tensors must share dtype, device and number of dims, got "
            + ", ".join(f"{tuple(x.shape)} {x.dtype} {x.device}" for x in xs)
        )
    info = group_info(group)
    src = normalize_dim(src_dim, xs[0].dim(), "src_dim")
    dst = normalize_dim(dst_dim, xs[0].dim(), "dst_dim")
    if src == dst:
        raise ValueError(f"dsp.switch_many: src_dim and dst_dim are the same dim ({src})")
    fulls = [src_size] * len(xs) if src_size is None or isinstance(src_size, int) else src_size
    if len(fulls) != len(xs):
        raise ValueError(f"dsp.switch_many: {len(xs)} tensors but src_size={src_size}")
    if info.size == 1:
        for x, full in zip(xs, fulls):
            if full is not None and full != x.shape[src]:
                raise ValueError(
                    f"dsp.switch_many: src_size={full} but dim {src} has length {x.shape[src]}"
                )
        return xs
    if any(f is None for f in fulls):
        rows = C.exchange_ints([x.shape[src] for x in xs], info.group, tag="switch_many:sizes")
        src_sizes = [[row[t] for row in rows] for t in range(len(xs))]
    else:
        src_sizes = [
            _shard_lengths(x, src, info, f, False, "switch_many", "src_size")
            for x, f in zip(xs, fulls)
        ]
    dst_sizes = [shard_sizes(x.shape[dst], info.size) for x in xs]
    return list(_SwitchMany.apply(src, dst, src_sizes, dst_sizes, info, *xs))
