"""Benchmark sweeps: one training (or inference) step per repeat, per strategy and size.

Each configuration runs on the ranks of a pool (:class:`dsp.launch.RankPool`, on loopback or
inside emulated hosts). Per configuration it records: step time per repeat (the slowest
rank's), the seconds that rank spent blocked in communication calls (``exposed_comm_s``,
``CommLog.wait_s``), bytes sent per rank in the forward and the backward (``dsp.comm_log``),
the bytes of the gradient synchronisation, saved-activation bytes and peak RSS per rank. A
configuration that fails records its error and the sweep goes on.
"""

from __future__ import annotations

import itertools
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch

from dsp.comm import collectives as C
from dsp.comm.log import comm_log
from dsp.launch import RankError
from dsp.memory import saved_activations
from dsp.parallelize.chunks import slice_counts

__all__ = ["BenchConfig", "rank_bench", "expand", "summarize"]


@dataclass(frozen=True)
class BenchConfig:
    """One point of a sweep. Sizes are the latent video before patchify."""

    model: str = "stdit-tiny"
    strategy: str = "dsp"
    plan: str = "auto"  # dsp: the planner's plan for these sizes, "hand", or a plan JSON file
    world_size: int = 2
    frames: int = 16
    height: int = 32
    width: int = 32
    batch: int = 1
    mode: str = "train"  # "train": forward + backward + optimizer step; "infer": forward
    warmup: int = 1
    repeats: int = 3
    depth: Optional[int] = None
    hidden: Optional[int] = None
    heads: Optional[int] = None
    text_len: int = 16
    grad_sync: bool = True  # average gradients over the group after backward (train)
    options: Dict[str, int] = field(default_factory=dict)  # strategy options, e.g. usp degree

    def model_overrides(self) -> dict:
        out = {"zero_init": False}
        for key, name in (("depth", "depth"), ("hidden", "hidden_size"), ("heads", "num_heads")):
            if getattr(self, key) is not None:
                out[name] = getattr(self, key)
        return out

    def patches(self, patch=(1, 2, 2)) -> int:
        return (self.height // patch[1]) * (self.width // patch[2])

    def tokens(self) -> int:
        return self.batch * self.frames * self.patches()


def expand(base: BenchConfig, **lists: Iterable) -> List[BenchConfig]:
    """Cartesian product of the given fields' values over ``base``."""
    keys = list(lists)
    out = []
    for values in itertools.product(*(lists[k] for k in keys)):
        out.append(BenchConfig(**{**asdict(base), **dict(zip(keys, values))}))
    return out


def _sync(info_group=None) -> None:
    """A tiny all-reduce: every rank leaves together (not inside any comm_log)."""
    C.all_reduce(torch.zeros(1), info_group, tag="bench_barrier")


def rank_bench(cfg: BenchConfig) -> dict:
    """Per-rank body: build, parallelize, time ``cfg.repeats`` steps. Runs inside a pool."""
    from dsp.models import build_model
    from dsp.strategies import get_strategy, meta_like

    if cfg.model.startswith("diffusers:"):  # diffusers' models, unchanged (bench/diffusers.py)
        from dsp.bench.diffusers import setup

        model, forward, target, strategy = setup(cfg)
    else:
        torch.manual_seed(0)
        model = build_model(cfg.model, **cfg.model_overrides())
        c = model.config
        g = torch.Generator().manual_seed(1)
        x = torch.randn(cfg.batch, c.in_channels, cfg.frames, cfg.height, cfg.width, generator=g)
        y = torch.randn(cfg.batch, cfg.text_len, c.caption_channels, generator=g)
        t = torch.randint(0, 1000, (cfg.batch,), generator=g)
        target = torch.randn(
            cfg.batch, c.out_channels, cfg.frames, cfg.height, cfg.width, generator=g
        )
        strategy = get_strategy(cfg.strategy, plan=cfg.plan, **cfg.options)
        strategy.apply(model, meta_like(x, t, y))

        def forward():
            return model(x, t, y)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if cfg.mode == "train" else None
    stats: dict = {}

    def step(measure: bool) -> None:
        if cfg.mode == "infer":
            with torch.no_grad(), comm_log() as log:
                forward()
            if measure:
                stats.update(fwd=log.sent("forward"), bwd=0, sync=0, saved=0)
            return
        opt.zero_grad(set_to_none=True)
        with comm_log() as log:
            if measure:
                with saved_activations(model.parameters()) as saved:
                    out = forward()
            else:
                out = forward()
            torch.nn.functional.mse_loss(out, target).backward()
        with comm_log() as sync_log:
            if cfg.grad_sync:
                strategy.sync_grads(model)
        opt.step()
        if measure:
            stats.update(
                fwd=log.sent("forward"),
                bwd=log.sent("backward"),
                sync=sync_log.bytes_sent,
                saved=saved.bytes,
            )

    for i in range(cfg.warmup):
        step(measure=(i == 0))
    if cfg.warmup == 0:
        step(measure=True)
    times, waits, cpus = [], [], []
    for _ in range(cfg.repeats):
        _sync(strategy.group)
        with comm_log() as timing:
            t0, c0 = time.perf_counter(), time.process_time()
            step(measure=False)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)  # this process, its gloo threads included
        waits.append(timing.wait_s)
    chosen = slice_counts(getattr(strategy, "plan", None))
    return {
        "times": times,
        "comm_waits": waits,
        "cpu_times": cpus,
        "chunks_chosen": chosen,
        "bytes_sent_forward": stats["fwd"],
        "bytes_sent_backward": stats["bwd"],
        "bytes_sent_grad_sync": stats["sync"],
        "saved_activation_bytes": stats["saved"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _exposed(per_rank: List[dict]) -> dict:
    """Exposed communication per step: the seconds the slowest rank of that step spent
    blocked in communication calls (its step time = its compute + this), plus every rank's
    median (ranks that wait for a slower one show more)."""
    n_steps = len(per_rank[0]["times"])
    ranks = range(len(per_rank))
    slowest = [max(ranks, key=lambda r: per_rank[r]["times"][i]) for i in range(n_steps)]
    steps = [per_rank[r]["comm_waits"][i] for i, r in enumerate(slowest)]
    return {
        "median": statistics.median(steps),
        "min": min(steps),
        "max": max(steps),
        "all": steps,
        "per_rank": [statistics.median(r["comm_waits"]) for r in per_rank],
    }


def _cpu_busy(per_rank: List[dict], step_s: float) -> Optional[dict]:
    """CPU seconds per step of every rank's process (median over steps, gloo's threads
    included), their sum, and that sum over the machine's cores x the median step: how busy
    the cores were (near 1: no idle core left for overlapped transfers to use)."""
    from dsp.bench.measure import usable_cores

    if not step_s or not all(r.get("cpu_times") for r in per_rank):
        return None
    per = [statistics.median(r["cpu_times"]) for r in per_rank]
    cores = usable_cores()
    return {
        "per_rank_s": per,
        "sum_s": sum(per),
        "cores": cores,
        "utilization": sum(per) / (cores * step_s),
    }


def summarize(cfg: BenchConfig, per_rank: Optional[List[dict]], error: str = "") -> dict:
    """One result row: the config plus the documented fields (docs/benchmarks.md)."""
    row = asdict(cfg)
    row.update(patches=cfg.patches(), tokens=cfg.tokens(), error=error or None)
    if not per_rank:
        row.update(
            step_time_s=None,
            exposed_comm_s=None,
            samples_per_s=None,
            tokens_per_s=None,
            bytes_sent_forward=None,
            bytes_sent_backward=None,
            bytes_sent_grad_sync=None,
            saved_activation_bytes=None,
            peak_rss_bytes=None,
            chunks_chosen=None,
            cpu_busy=None,
        )
        return row
    steps = [max(ts) for ts in zip(*(r["times"] for r in per_rank))]  # slowest rank per step
    med = statistics.median(steps)
    row.update(
        step_time_s={"median": med, "min": min(steps), "max": max(steps), "all": steps},
        exposed_comm_s=_exposed(per_rank),
        samples_per_s=cfg.batch / med,
        chunks_chosen=per_rank[0].get("chunks_chosen"),  # slice counts of its compute stages
        cpu_busy=_cpu_busy(per_rank, med),
        tokens_per_s=cfg.tokens() / med,
        **{
            k: max(r[k] for r in per_rank)
            for k in (
                "bytes_sent_forward",
                "bytes_sent_backward",
                "bytes_sent_grad_sync",
                "saved_activation_bytes",
                "peak_rss_bytes",
            )
        },
    )
    return row


def run_configs(
    configs: List[BenchConfig],
    pool_for: Callable[[int], object],
    on_result: Callable[[dict], None] = lambda r: None,
) -> List[dict]:
    """Run every config on ``pool_for(world_size)`` (a RankPool-like object).

    A failing configuration records its error; a pool broken by it is replaced.
    """
    rows = []
    for cfg in configs:
        try:
            pool = pool_for(cfg.world_size)
            row = summarize(cfg, pool.run(rank_bench, cfg))
        except RankError as e:  # a rank raised: keep the first rank's one-line reason
            first = e.errors[min(e.errors)].strip().splitlines()
            row = summarize(cfg, None, first[0] if first else "rank failed")
        except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
            row = summarize(cfg, None, f"{type(e).__name__}: {e}".splitlines()[0])
        rows.append(row)
        on_result(row)
    return rows
