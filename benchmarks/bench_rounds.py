"""``dsp bench`` in interleaved rounds, for a machine whose load changes under the benchmark.

    python benchmarks/bench_rounds.py --rounds 5 -- --link ib --world-size 2,4 \
        --strategy dsp,ulysses --frames 16 --height 32 --width 32 --single --json out.json

Everything after ``--`` is ``dsp bench``'s flags. Every world size's pool (and emulated link,
calibrated once) is set up at the start and kept; then every configuration of every world
size (the single-process reference included) runs one warm-up and one timed step per round,
round after round, in a rotated order, so that a burst of load from other processes falls on
all configurations alike instead of on whichever ran at the time.
A row's step time is the median over rounds, its ``cpu_flops_per_rank`` the median of the
measurements around its rounds.

Each world size N > 1 also runs, in the same rounds, a **compute proxy** per size: strategy
``none`` on ``ceil(T / N)`` frames on every rank at once (no communication; row field
``proxy_for_frames``). It measures what the bench model's own compute achieves under exactly
the contention the N-rank rows see; ``dsp simulate --from-bench`` takes its compute rate
from it. After its link is set up, each world size N > 1 also measures the achieved rates of
a ring step and of a pair exchange (``benchmarks/simulate_p2p.py``; ``ring_bytes_per_s``,
``pair_bytes_per_s`` in ``meta.link.per_world_size``), which price ring attention's steps.
Output as ``dsp bench`` (JSON schema of docs/benchmarks.md, markdown, plots) plus
``meta.rounds``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import statistics
import sys
from itertools import groupby

from dsp.bench.report import environment, markdown, plot, write_json
from dsp.bench.runner import run_configs
from dsp.bench.sweep import _flops_around, _pools_for, _timed
from dsp.cli.bench import configs_from_args, target_from_args
from dsp.cli.main import build_parser


def merge(rows):
    """One row from the per-round rows of one configuration."""
    ok = [r for r in rows if r["step_time_s"]]
    if not ok:
        return rows[0]
    times = [t for r in ok for t in r["step_time_s"]["all"]]
    med = statistics.median(times)
    row = dict(ok[0])
    flops = [r["cpu_flops_per_rank"] for r in ok if r.get("cpu_flops_per_rank")]
    exposed = [
        r["exposed_comm_s"]["median"] for r in ok if isinstance(r.get("exposed_comm_s"), dict)
    ]
    if exposed:  # the slowest rank's time blocked in collectives, median over rounds
        row["exposed_comm_s"] = {
            "median": statistics.median(exposed),
            "min": min(exposed),
            "max": max(exposed),
            "all": exposed,
        }
    busy = sorted((r["cpu_busy"] for r in ok if r.get("cpu_busy")), key=lambda b: b["utilization"])
    if busy:  # the round of median core utilization
        row["cpu_busy"] = busy[len(busy) // 2]
    row.update(
        repeats=len(times),
        step_time_s={"median": med, "min": min(times), "max": max(times), "all": times},
        samples_per_s=row["batch"] / med,
        tokens_per_s=row["tokens"] / med,
        cpu_flops_per_rank=statistics.median(flops) if flops else None,
    )
    return row


def proxies(configs):
    """The compute proxy of every (N > 1, size) in ``configs``: strategy none, T/N frames."""
    out = {}
    for c in configs:
        if c.world_size > 1 and c.strategy != "none":
            f = math.ceil(c.frames / c.world_size)
            p = dataclasses.replace(c, strategy="none", frames=f, grad_sync=False, options={})
            out.setdefault(repr(p), (p, c.frames))
    return out  # repr(config) -> (config, the frames it stands for)


def p2p_rates(pool, link: dict) -> dict:
    """Achieved ring-step and pair-exchange rates on ``pool`` (``simulate_p2p``), with a block
    that takes about 0.2 s at the link's achieved all-to-all rate."""
    from simulate_p2p import measure_p2p

    rate = link.get("achieved_bytes_per_s") or 1e9
    nbytes = int(min(64 * 2**20, max(2**20, 0.2 * rate)))
    return measure_p2p(pool, nbytes)


def run(args, rounds: int):
    """Every world size's pool (and link) open at once; each round runs every world size's
    configurations (world sizes and configurations in rotated order), so that the
    single-process reference and the N-rank rows share one load history."""
    configs = [dataclasses.replace(c, repeats=1) for c in configs_from_args(args)]
    extra = proxies(configs)
    configs += [p for p, _ in extra.values()]
    target = target_from_args(args)
    groups = [
        (n, list(g))
        for n, g in groupby(sorted(configs, key=lambda c: c.world_size), lambda c: c.world_size)
    ]
    rows, links, per = [], {}, {}
    with contextlib.ExitStack() as stack:
        getters = {}
        for n, group in groups:
            ref = max(group, key=lambda c: (c.strategy != "none", c.frames * c.height * c.width))
            get, links[n] = stack.enter_context(_pools_for(n, args.link, ref, target))
            getters[n] = get
            if n > 1:
                links[n].update(p2p_rates(get(n), links[n]))
            group[:] = [_timed(c, links[n]) for c in group]  # --chunks auto: this link
        for k in range(rounds):
            for n, group in groups[k % len(groups) :] + groups[: k % len(groups)]:
                order = list(range(len(group)))
                order = order[k % len(order) :] + order[: k % len(order)]
                get_m, on_m = _flops_around(getters[n], lambda r: None)
                for i, row in zip(order, run_configs([group[i] for i in order], get_m, on_m)):
                    per.setdefault((n, i), []).append(row)
            print(f"round {k + 1}/{rounds} done", flush=True)
    for n, group in groups:
        for i, cfg in enumerate(group):
            row = merge(per[(n, i)])
            row["link"] = links[n].get("description")
            if repr(cfg) in extra:
                row["proxy_for_frames"] = extra[repr(cfg)][1]
            rows.append(row)
    return rows, links


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then dsp bench flags")
    a = ap.parse_args()
    flags = a.bench[1:] if a.bench[:1] == ["--"] else a.bench
    args = build_parser().parse_args(["bench", *flags])
    rows, links = run(args, a.rounds)
    meta = environment()
    meta.update(
        command="python benchmarks/bench_rounds.py --rounds "
        f"{a.rounds} -- " + " ".join(shlex.quote(f) for f in flags),
        rounds=a.rounds,
        link={
            "setting": args.link,
            "per_world_size": links,
            "description": "; ".join(f"N={n}: {m.get('description')}" for n, m in links.items()),
        },
        config=vars(args) | {"func": None},
    )
    out_dir = args.out or os.path.dirname(os.path.abspath(args.json))
    stem = os.path.splitext(os.path.basename(args.json))[0]
    write_json(args.json, meta, rows)
    md = markdown(meta, rows)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(md)
    plot(rows, out_dir, prefix=stem + "_")
    print(md)
    return 0 if all(not r["error"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
