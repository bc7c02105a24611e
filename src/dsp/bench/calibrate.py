"""Pick an emulated link rate so that a CPU benchmark has a target workload's
communication-to-compute time ratio.

A benchmark on a small CPU box is only meaningful if communication costs, relative to
compute, what it would on the cluster it stands for. The ratio to reproduce is that of a
named target *workload* (:mod:`dsp.bench.target`: by default STDiT-XL/2, 64 frames x 64 x 64
tokens, bf16, H100 at its achieved FLOP/s, over InfiniBand or NVLink, DSP on the same N), as
``dsp simulate`` predicts it; on the CPU the bench model's DSP compute is measured on the
ranks and its bytes come from the formulas, and the link is set so that

    bench bytes / achieved rate = target ratio x bench compute seconds.

An earlier calibration matched the CPU's fp32 matmul FLOP/s to the H100's *peak* bf16
FLOP/s against the bandwidth (``rate = bandwidth x cpu_flops / peak_flops``,
:func:`target_rate` with a :data:`TARGETS` name). It ignored that the target sends bf16 where
the CPU sends fp32, reaches well under peak, and runs a model 4.5x wider (compute per token
grows with C^2, bytes with C): it made the emulated regime ~30x more communication-bound
than STDiT-XL/2 on H100 + InfiniBand. :func:`target_rate` stays for that comparison (reports
state it as ``peak_rate``) and for raw rates.

:func:`calibrated_link` builds an :class:`~dsp.bench.link.EmulatedLink`, measures the
all-to-all bandwidth dsp really achieves over it (gloo, TCP and the token bucket lose a good
part of the configured rate) and corrects the configured rate once, so that the *achieved*
rate is the wanted one.

Links (:data:`TARGETS`, per GPU): ``nvlink``: NVLink 4, 450 GB/s per direction per H100 SXM5
(NVIDIA H100 datasheet; 900 GB/s bidirectional), one node; ``ib``: NDR InfiniBand 400 Gb/s =
50 GB/s per direction per GPU (ConnectX-7, one NIC per GPU as in DGX H100), across nodes.
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
    "measure_loopback",
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


def measure_loopback(pool: RankPool, nbytes: int = 8 * 2**20) -> dict:
    """CPU FLOP/s per rank and the achieved all-to-all rate of a plain (loopback) pool.

    The same measurements as :func:`calibrated_link` makes on an emulated link, so that
    ``dsp simulate --from-bench`` can predict a loopback sweep from what that run measured.
    """
    out = {"cpu_flops_per_rank": measure_cpu_flops(pool=pool)}
    if pool.world_size > 1:
        out["achieved_bytes_per_s"] = measure_alltoall_bandwidth(pool, nbytes)
    return out


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
        match: for a named target, what the workload match measured and predicted
            (:mod:`dsp.bench.target`): ``target`` (description), ``target_ratio``,
            ``bench_compute_s``, ``bench_bytes``, ``efficiency``, ``peak_rate`` (what the old
            peak-FLOP/s calibration would have asked for) and, once the link is set,
            ``bench_ratio`` (DSP's bytes at the achieved rate over its compute).
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
    match: dict = field(default_factory=dict)

    @property
    def error(self) -> float:
        """Relative error of the achieved rate against the wanted one."""
        return self.achieved_rate / self.wanted_rate - 1

    def summary(self) -> str:
        """One line for reports."""
        how = "emulated" if self.emulated else f"loopback ({self.reason})"
        line = (
            f"{self.target} x{self.world_size} [{how}]: cpu {self.cpu_flops / 1e9:.1f} "
            f"GFLOP/s/rank, wanted {format_rate(self.wanted_rate)}, configured "
            f"{format_rate(self.configured_rate)}, achieved {format_rate(self.achieved_rate)} "
            f"({self.error:+.0%})"
        )
        m = self.match
        if m:
            line += (
                f"; target {m['target_workload']}: comm/compute {m['target_ratio']:.3f}, bench DSP "
                f"{m.get('bench_ratio', float('nan')):.3f} ({m['bench_bytes'] / 2**20:.1f} MiB "
                f"per rank over {m['bench_compute_s']:.3f} s of compute)"
            )
        return line


def _probe_size(rate: float, world_size: int, seconds: float) -> int:
    """A buffer whose all-to-all takes about ``seconds`` at ``rate``: 256 KiB .. 64 MiB."""
    nbytes = rate * seconds * world_size / (world_size - 1)
    return int(min(max(nbytes, 256 * 1024), 64 * 2**20))


def _match(pool, name: str, workload, target_workload) -> dict:
    """Measure the bench model's compute and predict the target's ratio (named targets)."""
    from dsp.bench.runner import BenchConfig
    from dsp.bench.target import TargetWorkload, bench_dsp_cost, measure_proxy, target_ratio

    cfg = workload if workload is not None else BenchConfig()
    tw = target_workload if target_workload is not None else TargetWorkload()
    flops = measure_cpu_flops(pool=pool)
    bench = bench_dsp_cost(cfg, pool.world_size, measure_proxy(pool, cfg), flops)
    out = target_ratio(name, pool.world_size, tw)
    out.update(
        cpu_flops=flops,
        bench_compute_s=bench["compute_s"],
        bench_bytes=bench["bytes"],
        efficiency=bench["efficiency"],
        bench_config=f"{cfg.model} {cfg.frames}x{cfg.height}x{cfg.width} "
        f"hidden={cfg.hidden} heads={cfg.heads} depth={cfg.depth}",
        peak_rate=target_rate(name, flops),
        wanted_rate=bench["bytes"] / (out["target_ratio"] * bench["compute_s"]),
    )
    return out


@contextlib.contextmanager
def calibrated_link(
    world_size: int,
    target: Union[str, Target, float, int] = "ib",
    *,
    workload=None,
    target_workload=None,
    tolerance: float = 0.15,
    probe_seconds: float = 0.3,
    timeout: float = 120.0,
    threads: int = 1,
    prefix: str = "dspbench",
    emulate: bool = True,
    verbose: bool = True,
) -> Iterator[Calibration]:
    """A :class:`RankPool` whose network gives a benchmark the ``target``'s
    communication-to-compute time ratio.

    ``target`` ``"ib"`` or ``"nvlink"``: workload-matched (:mod:`dsp.bench.target`): the
    ratio DSP has on ``target_workload`` (default STDiT-XL/2, 64 frames x 64 x 64 tokens,
    bf16, H100, over that link, the same N) as ``dsp simulate`` predicts it, reproduced for
    the bench config ``workload`` (a :class:`~dsp.bench.runner.BenchConfig`, default
    ``BenchConfig()``) on this CPU, whose per-rank compute is measured on the pool. Anything
    else is a raw rate (:func:`parse_rate`).

    Steps: build an :class:`EmulatedLink` (fast at first) and a pool inside it; measure the
    CPU FLOP/s per rank (:func:`measure_cpu_flops`) and, for a named target, the bench
    model's compute; set the link to the wanted rate; measure the achieved all-to-all
    bandwidth (:func:`measure_alltoall_bandwidth`, a buffer sized to take ``probe_seconds``);
    if it is off by more than ``tolerance``, scale the configured rate by wanted/achieved once
    and measure again. Yields a :class:`Calibration`; the pool and the link are removed on
    exit.

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

        with calibrated_link(4, "ib", workload=BenchConfig(frames=16)) as cal:
            print(cal.summary())
            cal.pool.run(my_benchmark_step)
    """
    if world_size < 2:
        raise ValueError(f"calibrated_link: needs at least 2 ranks, got {world_size}")
    named = _resolve(target)
    name = named.name if named is not None else str(target)
    if named is None:
        target_rate(target, None)  # a bad raw rate fails before any namespace exists
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
        match = _match(pool, name, workload, target_workload) if named is not None else {}
        flops = match["cpu_flops"] if match else measure_cpu_flops(pool=pool)
        wanted = match["wanted_rate"] if match else target_rate(target, flops)
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
            match=match,
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
        if match:
            match["bench_ratio"] = (
                match["bench_bytes"] / cal.achieved_rate / match["bench_compute_s"]
            )
        if verbose:
            print(f"dsp.bench: {cal.summary()}", file=sys.stderr)
        yield cal
