"""Measurements on a pool of ranks: fp32 matmul FLOP/s per rank and achieved all-to-all rate.

Used by the link calibration (:mod:`dsp.bench.calibrate`) and by every sweep, so that
``dsp simulate --from-bench`` can predict a run from what it measured.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import List, Optional, Tuple

from dsp.launch import RankPool

__all__ = ["measure_alltoall_bandwidth", "measure_cpu_flops", "measure_loopback"]


# ------------------------------------------------------------------ per-rank bodies (workers)
def _sync() -> None:
    """A tiny all-to-all as a barrier (dsp sends nothing around :mod:`dsp.comm.collectives`)."""
    import torch

    from dsp.comm.collectives import all_to_all
    from dsp.mesh import group_info

    n = group_info(None).size
    all_to_all(torch.zeros(n, dtype=torch.uint8), [1] * n, [1] * n, tag="bench-sync")


def _matmul_rates(n: int, per_sample: int, samples: int) -> List[float]:
    """FLOP/s of ``samples`` blocks of ``per_sample`` fp32 ``n x n`` matmuls, all ranks at once."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):  # warm up kernels and caches
        torch.mm(a, b)
    _sync()
    rates = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(per_sample):
            torch.mm(a, b)
        rates.append(2 * n**3 * per_sample / (time.perf_counter() - t0))
    _sync()  # nobody finishes early and leaves the cores to the others
    return rates


def _alltoall_spans(nbytes: int, reps: int, skew: float) -> Tuple[int, List[Tuple[float, float]]]:
    """Bytes this rank sends per all-to-all of ``nbytes`` (even split), and each rep's
    ``(start, end)`` on the system-wide monotonic clock; rank ``r`` starts ``r * skew`` s late.
    """
    import torch

    import dsp
    from dsp.comm.collectives import all_to_all
    from dsp.mesh import group_info

    info = group_info(None)
    n, r = info.size, info.rank
    splits = dsp.shard_sizes(nbytes, n)
    send = torch.zeros(nbytes, dtype=torch.uint8)
    recv_splits = [splits[r]] * n
    all_to_all(send, splits, recv_splits, tag="bench-warmup")  # connections, TCP windows
    spans, sent = [], 0
    for _ in range(reps):
        _sync()
        time.sleep(r * skew)
        with dsp.comm_log() as log:
            t0 = time.monotonic()
            all_to_all(send, splits, recv_splits, tag="bench")
            spans.append((t0, time.monotonic()))
        sent = log.bytes_sent
    return sent, spans


# ------------------------------------------------------------------------ measurements
def measure_cpu_flops(
    world_size: Optional[int] = None,
    *,
    pool: Optional[RankPool] = None,
    n: int = 512,
    per_sample: int = 16,
    samples: int = 7,
) -> float:
    """fp32 matmul FLOP/s one rank gets while all ``world_size`` ranks compute at once.

    Each rank (one thread, as :class:`RankPool` sets it) times ``samples`` blocks of
    ``per_sample`` ``n x n`` matmuls, started together after a barrier; the result is the
    median over ranks of each rank's median block. With more ranks than cores this is the
    per-rank *share* (4 ranks on 2 cores: about half a core each), which is what a benchmark
    on that many ranks gets. Runs on ``pool`` if given, else on a fresh loopback pool.
    """
    if pool is None:
        if world_size is None:
            raise ValueError("measure_cpu_flops: give world_size or pool")
        with RankPool(world_size) as p:
            return measure_cpu_flops(pool=p, n=n, per_sample=per_sample, samples=samples)
    per_rank = pool.run(_matmul_rates, n, per_sample, samples)
    return statistics.median(statistics.median(r) for r in per_rank)


def measure_alltoall_bandwidth(
    pool: RankPool, nbytes: int, *, reps: int = 3, skew: float = 0.01
) -> float:
    """Achieved per-rank all-to-all send bandwidth in bytes/s over ``pool``'s network.

    Every rank all-to-alls a buffer of ``nbytes`` (split evenly, so it sends
    ``nbytes * (N-1)/N`` to the others, counted by :func:`dsp.comm_log`) through
    :func:`dsp.comm.collectives.all_to_all`, ``reps`` times after one warm-up. Each rep
    starts after a barrier, rank ``r`` another ``r * skew`` seconds later, and lasts from the
    last rank's start to the last rank's end (on the machine-wide monotonic clock). The
    result is bytes sent per rank / the median rep.

    Why the skew: gloo sends a pair's data only after the receiver has said it is ready, and
    that "ready" message queues behind the receiver's own outgoing data. Ranks that arrive
    within microseconds of each other exchange in both directions at once; a rank that
    arrives later (as after any real compute phase, whose length varies by milliseconds)
    sends first and the other direction waits, so the exchange is about half-duplex. Without
    the skew the measurement flips between the two at random (a factor ~2 with 2 ranks); with
    it, it measures the half-duplex case benchmarks see.
    """
    if pool.world_size < 2:
        raise ValueError("measure_alltoall_bandwidth: needs at least 2 ranks")
    res = pool.run(_alltoall_spans, int(nbytes), reps, skew)
    sent = max(s for s, _ in res)
    durations = [
        max(spans[i][1] for _, spans in res) - max(spans[i][0] for _, spans in res)
        for i in range(reps)
    ]
    return sent / statistics.median(durations)


def measure_loopback(pool: RankPool, nbytes: int = 8 * 2**20) -> dict:
    """CPU FLOP/s per rank and the achieved all-to-all rate of a plain (loopback) pool.

    The same measurements as :func:`calibrated_link` makes on an emulated link, so that
    ``dsp simulate --from-bench`` can predict a loopback sweep from what that run measured.
    """
    out = {"cpu_flops_per_rank": measure_cpu_flops(pool=pool)}
    if pool.world_size > 1:
        out["achieved_bytes_per_s"] = measure_alltoall_bandwidth(pool, nbytes)
    return out


def usable_cores() -> int:
    """Cores this process may run on (its affinity; all of the machine's elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
