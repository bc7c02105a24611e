"""Predict a ``dsp bench`` run with the cost model, from what that run measured.

The "cluster" is the benchmark machine: one GPU per rank whose FLOP/s is the run's measured
fp32 matmul rate per rank (``cpu_flops_per_rank``, all ranks busy) times one efficiency, and
a link with the run's rates:

* compute rate, best first: the bench model's own FLOP/s measured by a compute proxy in the
  same interleaved rounds (``benchmarks/bench_rounds.py``: strategy none on ``ceil(T/N)``
  frames on all N ranks at once, so under the same contention, without communication);
  otherwise the matmul rate x the efficiency below;
* the matmul rate: the row's own ``cpu_flops_per_rank`` (measured on its pool right before
  and after that configuration, so that it follows the machine's changing load), else the
  world size's calibration figure;
* efficiency: how much of the matmul rate a whole training step achieves, from the run's
  single-process reference (``--single``: FLOPs of one step / its median time / its matmul
  rate); a run without it uses :data:`CPU_EFFICIENCY`;
* emulated link: bandwidth = the achieved rate of a ring step to distinct peers
  (``ring_bytes_per_s``, measured by ``benchmarks/bench_rounds.py``; else the configured tbf
  rate, which such a step nearly reaches), all-to-all efficiency = achieved all-to-all rate /
  bandwidth (gloo's all-to-all over a slow link is about half-duplex, see
  :func:`dsp.bench.calibrate.measure_alltoall_bandwidth`), pair efficiency (the steps of a
  ring of two, whose ranks send to and receive from the same peer: ring attention on 2 ranks,
  USP's ring across 2 rows) = the measured pair-exchange rate (``pair_bytes_per_s``) /
  bandwidth; a run without it takes the 2-rank all-to-all's achieved / configured rate, the
  same half-duplex exchange (:func:`pair_efficiency`);
* loopback: bandwidth = the fastest of the measured all-to-all, ring-step and pair-exchange
  rates; each pattern at its own measured rate (a run without the p2p measurements: the
  all-to-all rate for every pattern).

The gradient all-reduce runs after backward (no overlap). A row with overlapped switches
(``--chunks``) is the blocking prediction minus what its slices hide
(:func:`dsp.sim.overlapped.hidden_seconds`, the planner's own pipeline model; negative where
slices only add their cost, as with more ranks than cores).
"""

from __future__ import annotations

import json
import statistics
from typing import Dict, List, Optional, Tuple

from dsp.sim.flops import step_flops
from dsp.sim.hardware import Cluster, Gpu, Link
from dsp.sim.overlapped import hidden_seconds
from dsp.sim.step import simulate
from dsp.sim.workload import Workload

__all__ = [
    "CPU_EFFICIENCY",
    "bench_workload",
    "bench_cluster",
    "pair_efficiency",
    "predict_bench",
    "comparison",
]

#: Step FLOP/s over 512x512 fp32 matmul FLOP/s, used only for a run without a single-process
#: reference or compute proxy: a rough middle of what this session's runs measured for the
#: STDiT bench model (hidden 256, 8 heads, depth 2, 16 x 32 x 32) on the 2-core machine,
#: 0.40 to 0.67 depending on the load (2026-11-28).
CPU_EFFICIENCY = 0.5
_CPU_LATENCY = 1e-4  # seconds per gloo collective call on a local bridge / loopback


def bench_workload(row: dict, grad_sync: bool = True) -> Workload:
    """The :class:`Workload` of one ``dsp bench`` result row (fp32, no checkpointing)."""
    over = {
        k: row[j]
        for j, k in (("depth", "depth"), ("hidden", "hidden_size"), ("heads", "num_heads"))
        if row.get(j)
    }
    opts = row.get("options") or {}
    return Workload(
        model=row["model"],
        strategy=row["strategy"],
        frames=row["frames"],
        height=row["height"],
        width=row["width"],
        batch=row["batch"],
        mode=row["mode"],
        sp=row["world_size"],
        dp=1,
        text_len=row.get("text_len", 16),
        elem=4,
        param_elem=4,
        master_elem=4,
        activation_checkpointing=False,
        dp_style="ddp",
        grad_sync=grad_sync and row.get("grad_sync", True),
        ulysses_degree=opts.get("ulysses_degree"),
        overrides=over,
    )


def _links(meta: dict) -> Dict[int, dict]:
    return {int(k): v for k, v in meta.get("link", {}).get("per_world_size", {}).items()}


def _efficiency(data: dict, stat: str = "median") -> Tuple[float, str]:
    links = _links(data["meta"])
    rates = [v["cpu_flops_per_rank"] for v in links.values() if v.get("cpu_flops_per_rank")]
    single = [
        r
        for r in data["results"]
        if r["strategy"] == "none" and r["world_size"] == 1 and r["step_time_s"]
    ]
    if not single or not (rates or all(r.get("cpu_flops_per_rank") for r in single)):
        return CPU_EFFICIENCY, f"default {CPU_EFFICIENCY} (no single-process reference)"
    effs, used = [], []
    for r in single:
        flops = r.get("cpu_flops_per_rank") or max(rates)
        w = bench_workload(r)
        effs.append(step_flops(w, attn_bwd=2.0)["total"] / r["step_time_s"][stat] / flops)
        used.append(flops)
    eff = statistics.median(effs)
    return eff, (
        f"{eff:.3f} from the single-process step(s) at "
        + ", ".join(f"{f / 1e9:.1f}" for f in used)
        + " GFLOP/s"
    )


#: Pair-exchange rate / configured rate on the emulated link when a run measured neither the
#: pair exchange nor a 2-rank all-to-all (2 ranks, 80 MB/s configured: 35-45 MB/s measured).
PAIR_EFFICIENCY = 0.5


def pair_efficiency(meta: dict, n: int, bandwidth: float) -> float:
    """The fraction of ``bandwidth`` a pair exchange achieves on world size ``n``'s link: its
    measured ``pair_bytes_per_s``, else (emulated) the 2-rank link's all-to-all achieved /
    configured rate (two ranks' all-to-all is that same exchange), else
    :data:`PAIR_EFFICIENCY`; 1 on loopback without a measurement."""
    links = _links(meta)
    link = links.get(n, {})
    if link.get("pair_bytes_per_s"):
        return min(1.0, link["pair_bytes_per_s"] / bandwidth)
    if not link.get("emulated"):
        return 1.0
    two = links.get(2, {})
    got, set_ = two.get("achieved_bytes_per_s"), two.get("configured_bytes_per_s")
    if two.get("emulated") and got and set_:
        return min(1.0, got / set_)
    return PAIR_EFFICIENCY


def bench_cluster(meta: dict, n: int, efficiency: float, flops: Optional[float] = None) -> Cluster:
    """The benchmark machine as an ``n``-rank :class:`Cluster` (see the module doc)."""
    links = _links(meta)
    link = links.get(n, {})
    flops = (
        flops
        or link.get("cpu_flops_per_rank")
        or max(
            (v["cpu_flops_per_rank"] for v in links.values() if v.get("cpu_flops_per_rank")),
            default=None,
        )
    )
    if flops is None:
        raise ValueError(
            f"bench JSON has no measured CPU FLOP/s (N={n}): re-run dsp bench with this version"
        )
    gpu = Gpu("cpu", flops, efficiency, float("inf"), "measured by dsp bench")
    achieved = link.get("achieved_bytes_per_s") or 1e12
    ring = link.get("ring_bytes_per_s")
    if link.get("emulated"):  # a ring step to distinct peers nearly reaches the tbf rate
        bw = ring or link.get("configured_bytes_per_s") or achieved
    else:  # loopback: the fastest pattern measured is the wire; the others a fraction of it
        bw = max(r for r in (achieved, ring, link.get("pair_bytes_per_s")) if r)
    wire = Link(
        "bench",
        bw,
        _CPU_LATENCY,
        min(1.0, achieved / bw),
        link.get("description", ""),
        pair_efficiency(meta, n, bw),
    )
    return Cluster(n, 1, gpu, wire, wire, f"bench N={n}")


_SAME = ("model", "height", "width", "batch", "mode", "depth", "hidden", "heads", "world_size")


def _proxy_rate(data: dict, row: dict, stat: str = "median") -> Optional[float]:
    """FLOP/s the bench model itself achieved on ``row``'s ranks under the same contention:
    the compute proxy of ``benchmarks/bench_rounds.py`` (strategy none on ceil(T/N) frames on
    every rank at once), if the run has one for this size."""
    for p in data["results"]:
        if p.get("proxy_for_frames") == row["frames"] and p.get("step_time_s"):
            if all(p.get(k) == row.get(k) for k in _SAME):
                w = bench_workload({**p, "world_size": 1})
                return step_flops(w, attn_bwd=2.0)["total"] / p["step_time_s"][stat]
    return None


def predict_bench(data: dict, stat: str = "median") -> Tuple[List[dict], str]:
    """(prediction rows, efficiency note) for every configuration of a bench JSON (compute
    proxies excluded: they are the measurement the predictions start from).

    ``stat``: which step time of each row (and of the proxies and the single process) to use:
    ``"median"`` (what reports quote) or ``"min"`` (the fastest repeat: on a machine whose
    other load only ever slows steps down, the least disturbed one).
    """
    eff, note = _efficiency(data, stat)
    grad_sync = not data["meta"].get("config", {}).get("no_grad_sync", False)
    out = []
    for row in data["results"]:
        if not row.get("step_time_s") or row.get("proxy_for_frames"):
            continue
        w = bench_workload(row, grad_sync)
        rate = _proxy_rate(data, row, stat) if w.sp > 1 else None
        if rate is not None:  # the model's own compute rate, measured beside this row
            c = bench_cluster(data["meta"], w.sp, 1.0, rate)
        else:
            c = bench_cluster(data["meta"], w.sp, eff, row.get("cpu_flops_per_rank"))
        pred = simulate(w, c, overlap_dp=False, attn_bwd=2.0)
        from dsp.bench.report import label  # the bench's own names of its rows

        hidden = hidden_seconds(row, c, data["meta"].get("cpu_count"))  # sliced switches
        if hidden:
            pred["step_time_s"] = {k: v - hidden for k, v in pred["step_time_s"].items()}
        measured = row["step_time_s"][stat]
        exposed = row.get("exposed_comm_s") or {}
        pred.update(
            measured_exposed_comm_s=exposed.get(stat) if isinstance(exposed, dict) else exposed,
            measured_step_s=measured,
            predicted_step_s=pred["step_time_s"]["median"],
            error=None,
            ratio=pred["step_time_s"]["median"] / measured,
            measured_bytes=(row["bytes_sent_forward"], row["bytes_sent_backward"]),
            cpu_flops_per_rank=c.gpu.peak_flops,
            compute_rate_from="proxy" if rate is not None else "matmul x efficiency",
            hidden_comm_s=hidden,
            label=label(row),
        )
        out.append(pred)
    return out, note


def comparison(path: str, data: Optional[dict] = None, stat: str = "median") -> str:
    """A markdown table: predicted vs measured step time per configuration of ``path`` (and
    the communication time the run measured, ``exposed_comm_s``: the slowest rank's time
    blocked in collectives, where the run has it)."""
    if data is None:
        with open(path) as f:
            data = json.load(f)
    rows, note = predict_bench(data, stat)
    link = data["meta"].get("link", {}).get("description", "")
    lines = [
        f"`{path}`: {data['meta'].get('command', '')}",
        "",
        f"- link: {link}",
        f"- step efficiency (step FLOP/s / matmul FLOP/s): {note}",
        "",
        "| strategy | N | T x H x W | compute rate from | GFLOP/s/rank | compute s | comm s | "
        "hidden s | measured comm s | predicted s | measured s | predicted / measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        got = r.get("measured_exposed_comm_s")
        lines.append(
            f"| {r.get('label', r['strategy'])} | {r['world_size']} | "
            f"{r['frames']}x{r['height']}x{r['width']} | "
            f"{r['compute_rate_from']} | {r['cpu_flops_per_rank'] / 1e9:.1f} | "
            f"{r['compute_s']:.3f} | {r['exposed_comm_s']:.3f} | {r['hidden_comm_s']:.3f} | "
            f"{'' if got is None else f'{got:.3f}'} | {r['predicted_step_s']:.3f} | "
            f"{r['measured_step_s']:.3f} | {r['ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"
