"""Achieved point-to-point rates of the ring patterns, on a rank pool (for ``dsp simulate``).

``benchmarks/bench_rounds.py`` measures them on every world size's pool after its link is set
up and stores them in ``meta.link.per_world_size[N]``; ``dsp simulate --from-bench`` prices
ring steps with them (:func:`dsp.sim.frombench.bench_cluster`):

* ``ring_bytes_per_s``: every rank sends a block to rank ``r + 1`` while it receives one from
  ``r - 1`` (ring attention's step with N > 2 ranks, moved as ring attention moves it);
* ``pair_bytes_per_s``: every rank exchanges a block with rank ``r + N/2`` (send to and
  receive from the same peer: ring attention on 2 ranks, USP's ring across 2 rows).

Why both: over the emulated link gloo's exchange between two ranks is about half-duplex (a
receiver's "ready" message waits behind its own outgoing data on its rate-limited uplink), so
a pair exchange gets about half of the configured rate, where a ring of distinct peers gets
nearly all of it (measured on this machine: 2 ranks at 80 MB/s configured: pair 35-45 MB/s;
4 ranks at 40 MB/s: ring 38 MB/s, pair 19.5 MB/s).

Usage (in a script run from ``benchmarks/``, so that the rank processes import this module)::

    from simulate_p2p import measure_p2p
    rates = measure_p2p(pool, nbytes)   # {"ring_bytes_per_s": ..., "pair_bytes_per_s": ...}
"""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Tuple


def _spans(nbytes: int, peer: int, reps: int, skew: float) -> Tuple[int, List[Tuple[float, float]]]:
    """Per rank: bytes sent per rep and each rep's (start, end); rank r starts r * skew late.

    A step moves the block the way ring attention does (``dsp.comm.collectives.ring_shift``:
    one asynchronous all-to-all with one non-empty split each way, to ``r + 1`` of the ring's
    group); a pair (``peer = N/2``) is a ring of the two ranks ``r`` and ``r + N/2``, as USP's
    ring across 2 rows. Without ``ring_shift`` (older code): an isend/irecv pair."""
    import torch
    import torch.distributed as dist

    import dsp
    from dsp.comm import collectives

    r, n = dist.get_rank(), dist.get_world_size()
    send = torch.zeros(nbytes, dtype=torch.uint8)
    recv = torch.empty_like(send)
    shift = getattr(collectives, "ring_shift", None)
    group = None
    if shift is not None and peer != 1:  # every rank creates every pair's group, in order
        for i in range(peer):
            g = dist.new_group([i, i + peer])
            if r % peer == i:
                group = g

    def step():
        if shift is not None:
            works = shift(send, recv, group, tag="bench-p2p")
        else:
            works = collectives.send_recv(send, (r + peer) % n, recv, (r - peer) % n)
        for w in works:
            w.wait()

    step()  # connections, TCP windows
    spans, sent = [], 0
    for _ in range(reps):
        dist.barrier()
        time.sleep(r * skew)
        with dsp.comm_log() as log:
            t0 = time.monotonic()
            step()
            spans.append((t0, time.monotonic()))
        sent = log.bytes_sent
    return sent, spans


def _rate(pool, nbytes: int, peer: int, reps: int, skew: float) -> float:
    res = pool.run(_spans, int(nbytes), peer, reps, skew)
    sent = max(s for s, _ in res)
    durations = [
        max(sp[i][1] for _, sp in res) - max(sp[i][0] for _, sp in res) for i in range(reps)
    ]
    return sent / statistics.median(durations)


def measure_p2p(pool, nbytes: int, *, reps: int = 3, skew: float = 0.01) -> Dict[str, float]:
    """Per-rank send rates (bytes/s) of a ring step and of a pair exchange over ``pool``
    (see the module doc), each with a block of ``nbytes``, the median of ``reps``."""
    n = pool.world_size
    out = {}
    if n > 2:
        out["ring_bytes_per_s"] = _rate(pool, nbytes, 1, reps, skew)
    if n % 2 == 0:
        out["pair_bytes_per_s"] = _rate(pool, nbytes, n // 2, reps, skew)
    return out
