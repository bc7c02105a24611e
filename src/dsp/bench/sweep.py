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
def _pools_for(n: int, link: str):
    """Yield (get_pool, link_meta) for world size ``n``."""
    if link == "none" or n == 1:
        plain = _PlainPools()
        try:
            yield plain.get, {"description": "plain loopback", "emulated": False}
        finally:
            plain.close()
        return
    from dsp.bench.calibrate import calibrated_link

    with calibrated_link(n, link) as cal:
        meta = {
            "description": cal.summary(),
            "emulated": cal.emulated,
            "target": cal.target,
            "cpu_flops_per_rank": cal.cpu_flops,
            "wanted_bytes_per_s": cal.wanted_rate,
            "configured_bytes_per_s": cal.configured_rate,
            "achieved_bytes_per_s": cal.achieved_rate,
            "reason": cal.reason,
        }
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
) -> Tuple[List[dict], Dict[int, dict]]:
    """Run ``configs``; returns the result rows and the link settings per world size."""
    rows: List[dict] = []
    links: Dict[int, dict] = {}
    ordered = sorted(configs, key=lambda c: c.world_size)
    for n, group in groupby(ordered, key=lambda c: c.world_size):
        with _pools_for(n, link) as (get, meta):
            links[n] = meta
            for row in run_configs(list(group), get, on_result):
                row["link"] = meta.get("description")
                rows.append(row)
    return rows, links
