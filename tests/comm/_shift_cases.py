"""Per-rank body for ring_shift (module-level so worker processes can import it)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import dsp
from dsp.comm.collectives import ring_shift


def shift_once(dtype=torch.float32):
    """Rank r receives rank r-1's buffer (lengths differ per rank); bytes as send/recv."""
    n, r = dist.get_world_size(), dist.get_rank()
    send = torch.full((r + 2, 3), float(r)).to(dtype)
    recv = torch.empty(((r - 1) % n + 2, 3), dtype=dtype)
    with dsp.comm_log() as log:
        for w in ring_shift(send.t(), recv, tag="t"):  # a non-contiguous send is packed
            w.wait()
    assert torch.equal(recv, torch.full_like(recv, float((r - 1) % n)))
    e = send.element_size()
    (rec,) = log.records
    assert (rec.op, rec.bytes_sent, rec.bytes_recv) == (
        "send_recv",
        e * send.numel(),
        e * recv.numel(),
    )
    assert log.wait_s > 0
    return True
