"""The only module in dsp that calls ``torch.distributed`` communication.

Each wrapper issues one collective and records it in :mod:`dsp.comm.log`. Payloads travel as
``uint8`` views of flat contiguous buffers, so every dtype (bool, complex, bf16, ...) moves on
every backend and split sizes are simply element counts times the element size.

Byte conventions per rank (``e`` = element size, ``N`` = group size, ``r`` = this rank):

=================  ===================================  ===================================
op                 bytes_sent                           bytes_recv
=================  ===================================  ===================================
all_to_all         ``e * (sum(send_splits) - send[r])``  ``e * (sum(recv_splits) - recv[r])``
all_gather         ``e * n_r * (N - 1)``                 ``e * (sum(n) - n_r)``
reduce_scatter     ``e * (numel - n_r)``                 ``e * n_r * (N - 1)``
all_reduce         ``2 e numel (N - 1) / N`` (ring)      same
send / recv        ``e * numel`` / 0                     0 / ``e * numel``
=================  ===================================  ===================================

Every call that blocks on the network (the collectives, the posting of send/receive pairs and
the ``wait()`` of their works) runs inside :func:`dsp.comm.log.timed`, so a ``comm_log()``
block also sees how long this rank waited for communication (``CommLog.wait_s``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from dsp.comm.log import record, timed
from dsp.mesh import group_info

__all__ = [
    "all_to_all",
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "exchange_ints",
    "send_recv",
    "ring_shift",
    "all_to_all_async",
]


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """Flat ``uint8`` view of a tensor (made contiguous first)."""
    x = x.contiguous().reshape(-1)
    if x.dtype == torch.uint8:
        return x
    return x.view(torch.uint8)


def _a2a(
    send: torch.Tensor,
    send_splits: Sequence[int],
    recv_splits: Sequence[int],
    group: Optional[dist.ProcessGroup],
    async_op: bool = False,
):
    """Unrecorded uneven all-to-all of a flat buffer (splits in elements); the output, or
    ``(output, work)`` with ``async_op`` (the output is filled once the work completes)."""
    e = send.element_size()
    out = torch.empty(sum(recv_splits), dtype=send.dtype, device=send.device)
    out_b = out.view(torch.uint8) if out.dtype != torch.uint8 else out
    send_b = _bytes(send)
    with timed():
        work = dist.all_to_all_single(
            out_b,
            send_b,
            output_split_sizes=[s * e for s in recv_splits],
            input_split_sizes=[s * e for s in send_splits],
            group=group,
            async_op=async_op,
        )
    return (out, work) if async_op else out


def all_to_all(
    send: torch.Tensor,
    send_splits: Sequence[int],
    recv_splits: Sequence[int],
    group: Optional[dist.ProcessGroup] = None,
    *,
    tag: str = "",
) -> torch.Tensor:
    """Uneven all-to-all of a flat buffer; splits are in elements. Returns a flat tensor.

    Chunk ``j`` of ``send`` (``send_splits[j]`` elements) goes to rank ``j``; the result is
    the concatenation of what every rank sent here, in rank order.
    """
    info = group_info(group)
    if info.size == 1:
        return send.contiguous().reshape(-1).clone()
    out = _a2a(send, send_splits, recv_splits, group)
    _record_a2a(send, send_splits, recv_splits, info, tag)
    return out


def _record_a2a(send, send_splits, recv_splits, info, tag: str) -> None:
    """Record an all-to-all's bytes (everything but this rank's own split, each way)."""
    e, r = send.element_size(), info.rank
    sent, recv = sum(send_splits) - send_splits[r], sum(recv_splits) - recv_splits[r]
    record("all_to_all", info.size, e * sent, e * recv, tag=tag)


def all_gather(
    x: torch.Tensor,
    numels: Sequence[int],
    group: Optional[dist.ProcessGroup] = None,
    *,
    tag: str = "",
) -> torch.Tensor:
    """Gather flat buffers of ``numels[j]`` elements from every rank ``j``, in rank order.

    Even sizes use one ``all_gather_into_tensor``; uneven sizes one ``all_to_all_single``
    (gloo cannot all-gather unequal sizes). Both move the same bytes.
    """
    info = group_info(group)
    n_r = numels[info.rank]
    if x.numel() != n_r:
        raise ValueError(
            f"dsp.all_gather: rank {info.rank} holds {x.numel()} elements but the sizes say {n_r}"
        )
    if info.size == 1:
        return x.contiguous().reshape(-1).clone()
    e = x.element_size()
    total = sum(numels)
    out = torch.empty(total, dtype=x.dtype, device=x.device)
    out_b = out.view(torch.uint8) if out.dtype != torch.uint8 else out
    x_b = _bytes(x)
    if all(n == n_r for n in numels):
        gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        with timed():
            gather_single(out_b, x_b, group=group)
    else:
        send_b = x_b.repeat(info.size)
        with timed():
            dist.all_to_all_single(
                out_b,
                send_b,
                output_split_sizes=[n * e for n in numels],
                input_split_sizes=[n_r * e] * info.size,
                group=group,
            )
    record("all_gather", info.size, e * n_r * (info.size - 1), e * (total - n_r), tag=tag)
    return out


def reduce_scatter(
    x: torch.Tensor,
    numels: Sequence[int],
    group: Optional[dist.ProcessGroup] = None,
    *,
    tag: str = "",
) -> torch.Tensor:
    """Sum flat buffers over ranks; rank ``j`` keeps the ``j``-th chunk of ``numels[j]``.

    Implemented as one all-to-all plus a local sum, so uneven chunks work on every backend
    and the bytes equal a ring reduce-scatter's: ``e * (numel - numels[r])``.
    """
    info = group_info(group)
    if x.numel() != sum(numels):
        raise ValueError(
            f"dsp.reduce_scatter: input has {x.numel()} elements, chunks sum to {sum(numels)}"
        )
    n_r = numels[info.rank]
    if info.size == 1:
        return x.contiguous().reshape(-1).clone()
    recv = _a2a(x, list(numels), [n_r] * info.size, group)
    e = x.element_size()
    record("reduce_scatter", info.size, e * (x.numel() - n_r), e * n_r * (info.size - 1), tag=tag)
    return recv.view(info.size, n_r).sum(0)


def all_reduce(
    x: torch.Tensor, group: Optional[dist.ProcessGroup] = None, *, tag: str = ""
) -> torch.Tensor:
    """In-place sum over ranks; returns ``x``. Recorded with ring all-reduce bytes."""
    info = group_info(group)
    if info.size == 1:
        return x
    with timed():
        dist.all_reduce(x, group=group)
    b = x.numel() * x.element_size() * 2 * (info.size - 1) // info.size
    record("all_reduce", info.size, b, b, tag=tag)
    return x


def exchange_ints(
    values: Sequence[int], group: Optional[dist.ProcessGroup] = None, *, tag: str = ""
) -> List[List[int]]:
    """All-gather a short list of ints (same length on every rank). Recorded as metadata."""
    info = group_info(group)
    if info.size == 1:
        return [list(values)]
    t = torch.tensor(list(values), dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    out = torch.empty(info.size * t.numel(), dtype=torch.int64, device=t.device)
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with timed():
        gather_single(out, t, group=group)
    b = t.numel() * 8
    record("exchange_ints", info.size, b * (info.size - 1), b * (info.size - 1), meta=True, tag=tag)
    return out.view(info.size, -1).tolist()


def send_recv(
    send: torch.Tensor,
    dst: int,
    recv: torch.Tensor,
    src: int,
    group: Optional[dist.ProcessGroup] = None,
    *,
    tag: str = "",
) -> List[_TimedWork]:
    """Post one isend to ``dst`` and one irecv from ``src`` (group ranks); returns the works.

    Both are recorded when posted. The caller waits on the returned works; their ``wait()``
    is timed (:func:`dsp.comm.log.timed`).
    """
    info = group_info(group)
    to_global = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    ops = [
        dist.P2POp(dist.isend, send.contiguous(), to_global(dst), group=group),
        dist.P2POp(dist.irecv, recv, to_global(src), group=group),
    ]
    with timed():
        works = dist.batch_isend_irecv(ops)
    e = send.element_size()
    record("send_recv", info.size, e * send.numel(), e * recv.numel(), tag=tag)
    return [_TimedWork(w) for w in works]


def ring_shift(
    send: torch.Tensor,
    recv: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    tag: str = "",
) -> List[_TimedWork]:
    """Every rank sends ``send`` to the next rank of the group and receives ``recv`` (a
    contiguous buffer) from the previous one; returns the work to wait on.

    All ranks of the group call it together: it is one asynchronous ``all_to_all_single`` with
    one non-empty split each way (torch's ring attention moves its blocks the same way). On
    gloo this keeps ring attention's transfers on the process group's worker thread, where
    they overlap compute better than an isend/irecv pair does with 3 ranks on 2 cores
    (``benchmarks/ring_vs_torch.py``). Recorded as ``send_recv``: ``e * numel`` sent to one
    peer, ``e * recv.numel()`` received; the posting is timed, and so is the ``wait()``.
    """
    info = group_info(group)
    n, r, e = info.size, info.rank, send.element_size()
    if not recv.is_contiguous():
        raise ValueError("dsp.ring_shift: recv must be a contiguous buffer")
    send_splits, recv_splits = [0] * n, [0] * n
    send_splits[(r + 1) % n] = send.numel() * e
    recv_splits[(r - 1) % n] = recv.numel() * e
    out_b = recv.reshape(-1)
    out_b = out_b.view(torch.uint8) if out_b.dtype != torch.uint8 else out_b
    send_b = _bytes(send)  # the work keeps it alive until it completes
    with timed():
        work = dist.all_to_all_single(
            out_b, send_b, recv_splits, send_splits, group=group, async_op=True
        )
    record("send_recv", n, e * send.numel(), e * recv.numel(), tag=tag)
    return [_TimedWork(work)]


def all_to_all_async(
    send: torch.Tensor,
    send_splits: Sequence[int],
    recv_splits: Sequence[int],
    group: Optional[dist.ProcessGroup] = None,
    *,
    tag: str = "",
):
    """:func:`all_to_all` started, not finished: returns ``(out, work)``; ``out`` holds the
    result once ``work.wait()`` returns (the wait is timed). Recorded when it starts. The work
    keeps ``send`` alive until it completes."""
    out, work = _a2a(send, send_splits, recv_splits, group, async_op=True)
    _record_a2a(send, send_splits, recv_splits, group_info(group), tag)
    return out, _TimedWork(work)


class _TimedWork:
    """A posted operation whose ``wait()`` counts as time blocked on communication."""

    def __init__(self, work: dist.Work):
        self._work = work

    def wait(self, *args, **kwargs):
        with timed():
            return self._work.wait(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._work, name)


def all_reduce_coalesced(
    tensors: Sequence[torch.Tensor],
    group: Optional[dist.ProcessGroup] = None,
    *,
    average: bool = False,
    tag: str = "",
) -> None:
    """Sum (or average) many tensors over ranks in place, one all-reduce per dtype.

    One flat buffer per dtype: one collective's latency instead of one per tensor (gradient
    synchronisation of a model), the same bytes.
    """
    info = group_info(group)
    if info.size == 1:
        return
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        all_reduce(flat, group, tag=tag)
        if average:
            flat.div_(info.size)
        offset = 0
        for t in ts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
