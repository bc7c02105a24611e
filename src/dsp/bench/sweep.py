"""Run a list of benchmark configs, grouped by world size, on loopback or an emulated link."""

from __future__ import annotations

import contextlib
from itertools import groupby
from typing import Callable, Dict, List, Tuple

from dsp.bench.runner import BenchConfig, run_configs
from dsp.launch import RankPool

__all__ = ["run_sweep"]


class _PlainPools:
    """One RankPool per world size on loopback, replaced when a failure breaks it."""

    def __init__(self):
        self.pool = None

    def get(self, n: int) -> RankPool:
        if self.pool is None or self.pool.broken or self.pool.world_size != n:
            self.close()
            self.pool = RankPool(n, timeout=600)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


@contextlib.contextmanager
def _pools_for(n: int, link: str, workload=None, target=None):
    """Yield (get_pool, link_meta) for world size ``n``; an emulated link is matched to
    ``target`` (a :class:`~dsp.bench.target.TargetWorkload`) for bench config ``workload``."""
    if link == "none" or n == 1:
        plain = _PlainPools()
        try:
            meta = {"description": "plain loopback", "emulated": False}
            from dsp.bench.calibrate import measure_loopback  # for dsp simulate --from-bench

            meta.update(measure_loopback(plain.get(n)))
            yield plain.get, meta
        finally:
            plain.close()
        return
    from dsp.bench.calibrate import calibrated_link

    with calibrated_link(n, link, workload=workload, target_workload=target) as cal:
        meta = cal.meta()
        pool_kwargs = cal.link.pool_kwargs() if cal.link is not None else {}
        replacements = []

        def get(_n: int):
            if cal.pool.broken:  # a failed config left ranks out of step: a fresh pool
                cal.pool.close()
                cal.pool = RankPool(n, timeout=600, **pool_kwargs)
                replacements.append(cal.pool)
            return cal.pool

        try:
            yield get, meta
        finally:  # before the link (and its namespaces) goes away
            for pool in replacements:
                pool.close()


def run_sweep(
    configs: List[BenchConfig],
    link: str = "none",
    on_result: Callable[[dict], None] = lambda r: None,
    target=None,
) -> Tuple[List[dict], Dict[int, dict]]:
    """Run ``configs``; returns the result rows and the link settings per world size.

    An emulated link is calibrated per world size for the group's largest config (most
    frames) against ``target`` (:class:`~dsp.bench.target.TargetWorkload`, default STDiT-XL/2).
    """
    rows: List[dict] = []
    links: Dict[int, dict] = {}
    ordered = sorted(configs, key=lambda c: c.world_size)
    for n, group in groupby(ordered, key=lambda c: c.world_size):
        group = list(group)
        ref = max(group, key=lambda c: (c.strategy != "none", c.frames * c.height * c.width))
        with _pools_for(n, link, ref, target) as (get, meta):
            links[n] = meta
            group = [_timed(c, meta) for c in group]
            get_measured, on_measured = _flops_around(get, on_result)
            for row in run_configs(group, get_measured, on_measured):
                row["link"] = meta.get("description")
                rows.append(row)
    return rows, links


def _flops_around(get, on_result):
    """Wrap (pool_for, on_result) so that each config's row carries ``cpu_flops_per_rank``:
    the mean of a short matmul measurement on its pool right before and right after it (the
    machine's load changes from one config to the next; ``dsp simulate --from-bench`` uses it).
    """
    from dsp.bench.calibrate import measure_cpu_flops

    state = {}

    def measure(pool):
        try:
            return measure_cpu_flops(pool=pool, per_sample=8, samples=3)
        except Exception:  # noqa: BLE001 - a broken pool: the config records its own error
            return None

    def get_measured(n):
        state["pool"] = pool = get(n)
        state["before"] = measure(pool)
        return pool

    def on_measured(row):
        pool = state.get("pool")
        after = measure(pool) if pool is not None and not pool.broken else None
        both = [v for v in (state.get("before"), after) if v]
        row["cpu_flops_per_rank"] = sum(both) / len(both) if both else None
        on_result(row)

    return get_measured, on_measured


#: Seconds one more overlapped slice costs a stage per direction on the CPU ranks (Python,
#: the slicing copies, gloo's launch and wait), fitted to the quiet N = 2 training run of
#: benchmarks/results/overlap_ib_quiet_vm_2026-11-28.md (gains of 2, 4 and 8 slices:
#: 1.25-1.8 ms per slice).
CPU_SLICE_OVERHEAD = 1.5e-3


def bench_timing_cluster(meta: dict, n: int) -> dict:
    """The benchmark's ranks and link as a cluster (fields of :class:`~dsp.sim.hardware.
    Cluster`) for the planner's choice of slices (``--chunks auto``): the measured link and
    FLOP/s (:func:`dsp.sim.frombench.bench_cluster`), overlap 1 while each rank has a core of
    its own and 0 once ranks share cores (a rank's wait is then another rank's compute),
    :data:`CPU_SLICE_OVERHEAD` per slice."""
    import dataclasses

    from dsp.bench.measure import usable_cores
    from dsp.sim.frombench import CPU_EFFICIENCY, bench_cluster

    c = bench_cluster({"link": {"per_world_size": {n: meta}}}, n, CPU_EFFICIENCY)
    cores = usable_cores()
    c = dataclasses.replace(
        c,
        gpu=dataclasses.replace(c.gpu, memory=2.0**60),  # finite: the row stays strict JSON
        overlap=1.0 if n <= cores else 0.0,
        slice_overhead=CPU_SLICE_OVERHEAD,
    )
    return dataclasses.asdict(c)


def _timed(cfg: BenchConfig, meta: dict) -> BenchConfig:
    """``cfg`` with the cluster its ``chunks="auto"`` plans for (others unchanged)."""
    if cfg.options.get("chunks") != "auto":
        return cfg
    import dataclasses

    if cfg.world_size < 2:  # nothing to overlap on one rank
        return dataclasses.replace(cfg, options={**cfg.options, "chunks": 1})

    cluster = bench_timing_cluster(meta, cfg.world_size)
    training = cfg.mode == "train"
    return dataclasses.replace(
        cfg, options={**cfg.options, "cluster": cluster, "training": training}
    )
