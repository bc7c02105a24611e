"""Pick an emulated link rate so that a CPU run has a target machine's compute:communication ratio.

A benchmark on a small CPU box is only meaningful if communication costs what it would on the
machine it stands for. An H100 computes about 989 TFLOP/s; one CPU core about 10^11 FLOP/s,
~10^4 times less. If the network is slowed down by the same factor, every compute phase and
every transfer takes ~10^4 times longer than on the target, and their *ratio* (the thing
that decides which parallel strategy wins) is the target's:

    rate_cpu = bandwidth_target * flops_cpu / flops_target

where ``flops_cpu`` is the fp32 matmul throughput one rank gets *while all ranks compute at
once* (ranks share the cores) and ``bandwidth_target`` is the per-GPU bandwidth in one
direction. :func:`calibrated_link` measures ``flops_cpu``, computes the wanted rate, builds an
:class:`~dsp.bench.link.EmulatedLink`, measures the all-to-all bandwidth dsp really achieves
over it (gloo, TCP and the token bucket lose a good part of the configured rate) and corrects
the configured rate once, so that the *achieved* rate is the wanted one.

Targets (:data:`TARGETS`), per GPU:

* ``nvlink``: NVIDIA H100 SXM5, dense BF16 tensor-core throughput 989 TFLOP/s (NVIDIA H100
  Tensor Core GPU datasheet, the figure *without* sparsity; the headline 1979 TFLOP/s assumes
  2:4 sparsity). NVLink 4: 18 links x 50 GB/s = 900 GB/s bidirectional, i.e. 450 GB/s per
  direction per GPU (same datasheet), as within one DGX/HGX H100 node.
* ``ib``: the same GPU across nodes over NDR InfiniBand, 400 Gb/s = 50 GB/s per direction per
  GPU (NVIDIA ConnectX-7; one NIC per GPU as in DGX H100, 8 x 400 Gb/s per node).

Every other collective pattern (all-gather, ring p2p) is assumed to see the same per-rank
rate as the all-to-all it is calibrated with; see "Caveats" in :func:`calibrated_link`.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple, Union

from dsp.bench.link import EmulatedLink, format_rate, netns_available
from dsp.launch import RankPool

__all__ = [
    "TARGETS",
    "Target",
    "Calibration",
    "calibrated_link",
    "measure_alltoall_bandwidth",
    "measure_cpu_flops",
    "parse_rate",
    "target_rate",
]


@dataclass(frozen=True)
class Target:
    """A machine to emulate: per-GPU dense throughput and per-GPU bandwidth (one direction).

    Attributes:
        name: short key (``"nvlink"``, ``"ib"``).
        flops: dense throughput in FLOP/s (no sparsity).
        bandwidth: bytes/s one GPU can send while it also receives (one direction).
        description: what the numbers stand for and where they come from.
    """

    name: str
    flops: float
    bandwidth: float
    description: str


#: Named targets; see the module docstring for the sources of the numbers.
TARGETS = {
    "nvlink": Target(
        "nvlink",
        989e12,
        450e9,
        "H100 SXM5, 989 TFLOP/s dense BF16 (NVIDIA H100 datasheet, without sparsity); "
        "NVLink 4, 450 GB/s per direction per GPU (900 GB/s bidirectional), one node",
    ),
    "ib": Target(
        "ib",
        989e12,
        50e9,
        "H100 SXM5, 989 TFLOP/s dense BF16; NDR InfiniBand 400 Gb/s = 50 GB/s per GPU "
        "(ConnectX-7, one NIC per GPU as in DGX H100), across nodes",
    ),
}

_BYTE_UNITS = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_BYTE_UNITS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40})
_BIT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([A-Za-z/]*)\s*$")


def parse_rate(rate: Union[str, float, int]) -> float:
    """A rate in bytes/s from a number (bytes/s) or a string with units.

    Bytes (capital ``B``, decimal or binary prefixes, ``/s`` optional): ``"25MB/s"``,
    ``"1.5 GB/s"``, ``"512KiB/s"``, ``"800kB"``. Bits (``bit`` as in tc, any case, or
    ``b/s``): ``"200mbit"``, ``"400Mbit/s"``, ``"10Gb/s"``. ``"bps"`` is refused: tc reads it
    as bytes/s, most people as bits/s.

    Raises:
        ValueError: unparsable, unknown unit, or not positive.
    """
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        value = float(rate)
    else:
        m = _RATE_RE.match(str(rate))
        if not m:
            raise ValueError(f"dsp.bench: cannot parse rate {rate!r} (e.g. '25MB/s', '200mbit')")
        num, unit = float(m.group(1)), m.group(2)
        if unit.lower().endswith("bps"):
            raise ValueError(
                f"dsp.bench: ambiguous rate unit in {rate!r}: write bytes as 'MB/s' or bits as "
                "'mbit' / 'Mb/s'"
            )
        stem = unit[:-2] if unit.endswith("/s") else unit
        if stem.endswith("B") and stem[:-1] in _BYTE_UNITS:
            value = num * _BYTE_UNITS[stem[:-1]]
        elif stem.lower().endswith("bit") and stem[:-3].lower() in _BIT_UNITS:
            value = num * _BIT_UNITS[stem[:-3].lower()] / 8
        elif stem.endswith("b") and stem[:-1].lower() in _BIT_UNITS:
            value = num * _BIT_UNITS[stem[:-1].lower()] / 8
        elif unit == "":
            value = num
        else:
            raise ValueError(
                f"dsp.bench: unknown rate unit {unit!r} in {rate!r} (use B/s, kB/s, MB/s, "
                "GB/s, KiB/s, MiB/s, bit, kbit, mbit, gbit, Mb/s, Gb/s)"
            )
    if not value > 0:
        raise ValueError(f"dsp.bench: rate must be positive, got {rate!r}")
    return value


def _resolve(target: Union[str, Target, float, int]) -> Optional[Target]:
    """A :class:`Target` for a name or a Target; ``None`` for a raw rate."""
    if isinstance(target, Target):
        return target
    if isinstance(target, str) and target in TARGETS:
        return TARGETS[target]
    return None


def target_rate(target: Union[str, Target, float, int], cpu_flops: Optional[float]) -> float:
    """The emulated per-rank rate (bytes/s) for ``target`` on a CPU doing ``cpu_flops``.

    For a named target (or a :class:`Target`): ``bandwidth * cpu_flops / flops``, so that the
    compute:communication ratio on the CPU matches the target's. Anything else is read as a
    raw rate by :func:`parse_rate` (``"25MB/s"``, ``"200mbit"``, a number of bytes/s) and
    returned as it is; ``cpu_flops`` is then unused.
    """
    t = _resolve(target)
    if t is None:
        try:
            return parse_rate(target)
        except ValueError as e:
            raise ValueError(f"{e}; or name a target: {', '.join(sorted(TARGETS))}") from None
    if cpu_flops is None or not cpu_flops > 0:
        raise ValueError(f"dsp.bench: target {t.name!r} needs the CPU FLOP/s, got {cpu_flops}")
    return t.bandwidth * cpu_flops / t.flops


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


# ---------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    """What :func:`calibrated_link` set up and measured (all rates in bytes/s per rank).

    Attributes:
        pool: the :class:`RankPool` to benchmark on (inside the namespaces when emulated).
        target: the target name (or the raw rate string given).
        world_size: number of ranks.
        cpu_flops: measured fp32 matmul FLOP/s per rank with all ranks busy.
        wanted_rate: what the target asks for (:func:`target_rate`).
        configured_rate: the tbf rate finally set (``None`` without emulation).
        achieved_rate: the all-to-all bandwidth measured at ``configured_rate``.
        emulated: whether a rate-limited link is in use; ``False`` means plain loopback.
        reason: why not emulated (empty when emulated).
        link: the :class:`EmulatedLink` (``None`` without emulation).
        steps: ``(configured, achieved)`` per measurement, in order.
        nbytes: the all-to-all buffer size used to measure.
    """

    pool: RankPool
    target: str
    world_size: int
    cpu_flops: float
    wanted_rate: float
    configured_rate: Optional[float]
    achieved_rate: float
    emulated: bool
    reason: str = ""
    link: Optional[EmulatedLink] = None
    steps: List[Tuple[Optional[float], float]] = field(default_factory=list)
    nbytes: int = 0

    @property
    def error(self) -> float:
        """Relative error of the achieved rate against the wanted one."""
        return self.achieved_rate / self.wanted_rate - 1

    def summary(self) -> str:
        """One line for reports."""
        how = "emulated" if self.emulated else f"loopback ({self.reason})"
        return (
            f"{self.target} x{self.world_size} [{how}]: cpu {self.cpu_flops / 1e9:.1f} "
            f"GFLOP/s/rank, wanted {format_rate(self.wanted_rate)}, configured "
            f"{format_rate(self.configured_rate)}, achieved {format_rate(self.achieved_rate)} "
            f"({self.error:+.0%})"
        )


def _probe_size(rate: float, world_size: int, seconds: float) -> int:
    """A buffer whose all-to-all takes about ``seconds`` at ``rate``: 256 KiB .. 64 MiB."""
    nbytes = rate * seconds * world_size / (world_size - 1)
    return int(min(max(nbytes, 256 * 1024), 64 * 2**20))


@contextlib.contextmanager
def calibrated_link(
    world_size: int,
    target: Union[str, Target, float, int] = "ib",
    *,
    tolerance: float = 0.15,
    probe_seconds: float = 0.3,
    timeout: float = 120.0,
    threads: int = 1,
    prefix: str = "dspbench",
    emulate: bool = True,
    verbose: bool = True,
) -> Iterator[Calibration]:
    """A :class:`RankPool` whose network has the ``target``'s compute:communication ratio.

    Steps: build an :class:`EmulatedLink` (fast at first) and a pool inside it; measure the
    CPU FLOP/s per rank (:func:`measure_cpu_flops`); set the link to the wanted rate
    (:func:`target_rate`); measure the achieved all-to-all bandwidth
    (:func:`measure_alltoall_bandwidth`, a buffer sized to take ``probe_seconds``); if it is
    off by more than ``tolerance``, scale the configured rate by wanted/achieved once and
    measure again. Yields a :class:`Calibration`; the pool and the link are removed on exit.

    Without network namespaces (not root, no iproute2, ``emulate=False``) it prints one line
    saying why and yields a plain loopback pool (``emulated=False``, ``configured_rate=None``,
    ``achieved_rate`` = the loopback all-to-all bandwidth, far above the wanted rate).

    Caveats:

    * The correction is for all-to-all with ranks arriving a little apart (see
      :func:`measure_alltoall_bandwidth`): gloo's all-to-all over a slow link is then about
      half-duplex per pair of ranks, so with 2 ranks the configured rate ends up about twice
      the wanted one (about 1.3x with 4 ranks), and a pattern that only sends one way (a ring
      step, a one-sided send) sees up to that factor more than the wanted rate.
    * It is a snapshot: other load on the machine changes both the FLOP/s and the achieved
      rate. With 4 or more ranks single measurements scatter by about +-10%.
    * Only bandwidth is emulated; latency stays that of a local bridge (tens of
      microseconds), far below a scaled-up target latency.

    Example::

        with calibrated_link(4, "ib") as cal:
            print(cal.summary())
            cal.pool.run(my_benchmark_step)
    """
    if world_size < 2:
        raise ValueError(f"calibrated_link: needs at least 2 ranks, got {world_size}")
    name = _resolve(target).name if _resolve(target) is not None else str(target)
    ok, why = netns_available() if emulate else (False, "emulation switched off")
    with contextlib.ExitStack() as stack:
        link = None
        if ok:
            # fast while the workers start and measure compute; slowed down afterwards
            link = stack.enter_context(EmulatedLink(world_size, 10e9, prefix=prefix))
            kw = link.pool_kwargs()
        else:
            print(
                f"dsp.bench: no emulated link ({why}); plain loopback, communication is NOT "
                "to scale with the target",
                file=sys.stderr,
            )
            kw = {}
        pool = stack.enter_context(RankPool(world_size, timeout=timeout, threads=threads, **kw))
        flops = measure_cpu_flops(pool=pool)
        wanted = target_rate(target, flops)
        nbytes = _probe_size(wanted, world_size, probe_seconds)
        cal = Calibration(
            pool=pool,
            target=name,
            world_size=world_size,
            cpu_flops=flops,
            wanted_rate=wanted,
            configured_rate=None,
            achieved_rate=0.0,
            emulated=ok,
            reason="" if ok else why,
            link=link,
            nbytes=nbytes,
        )
        if link is not None:
            configured = wanted
            link.set_rate(configured)
            achieved = measure_alltoall_bandwidth(pool, nbytes)
            cal.steps.append((configured, achieved))
            if abs(achieved / wanted - 1) > tolerance:
                configured = configured * wanted / achieved
                link.set_rate(configured)
                achieved = measure_alltoall_bandwidth(pool, nbytes)
                cal.steps.append((configured, achieved))
            cal.configured_rate, cal.achieved_rate = configured, achieved
        else:
            cal.achieved_rate = measure_alltoall_bandwidth(pool, nbytes)
            cal.steps.append((None, cal.achieved_rate))
        if verbose:
            print(f"dsp.bench: {cal.summary()}", file=sys.stderr)
        yield cal
