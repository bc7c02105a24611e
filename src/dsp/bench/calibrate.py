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
import sys
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple, Union

from dsp.bench.link import EmulatedLink, format_rate, netns_available
from dsp.bench.measure import measure_alltoall_bandwidth, measure_cpu_flops, measure_loopback
from dsp.bench.rates import TARGETS, Target, _resolve, parse_rate, target_rate
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

    def meta(self) -> dict:
        """What reports record about the link (``meta.link.per_world_size[N]``)."""
        return {
            **self.match,
            "description": self.summary(),
            "emulated": self.emulated,
            "target": self.target,
            "cpu_flops_per_rank": self.cpu_flops,
            "wanted_bytes_per_s": self.wanted_rate,
            "configured_bytes_per_s": self.configured_rate,
            "achieved_bytes_per_s": self.achieved_rate,
            "reason": self.reason,
        }

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
