"""Sampling latency of whole ``dsp sample`` runs: one process vs Ulysses vs DSP, emulated link.

    python benchmarks/sample_latency.py --rounds 3 --world-size 2,4 --link ib \\
        --json benchmarks/results/sample_latency_ib_vm_2026-11-28.json

What the paper reports for inference: the end-to-end latency of a sampling run (every
denoising step, classifier-free guidance: a conditional and an unconditional forward per
step), here on CPU ranks joined by the emulated link of ``dsp sample --link`` (calibrated
as ``dsp bench --mode infer --link`` for the same model and latent size, once per N, with
DSP's configuration). Every run is ``dsp sample``'s own code path
(:func:`dsp.cli.sample._sample_rank`, i.e. :func:`dsp.sample.sample`) on a random model.

One pool per world size (and its link) is set up first and kept; the single-process
reference runs on a one-rank pool (one thread, as every rank). Each variant runs once with
one step as a warm-up, then every variant runs once per round, round after round, in a
rotated order, so that load from other processes falls on all of them alike. A variant's
latency is the median over rounds of its slowest rank's sampling loop (all steps, from the
noise to the last Euler step: what ``dsp sample`` prints as ``total s``); ``wall`` adds
building the model, planning and applying the strategy, and gathering the results. Every
run's latents are compared with the single-process ones (they must agree to fp32 rounding).

Writes JSON ({meta, results}), markdown and a PNG beside ``--json``; ``--quick`` is a smoke
run (tiny model, N = 2, two steps, one round).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import time

from dsp.bench.report import environment, uptime
from dsp.cli.lists import ints, names
from dsp.cli.sample import LOOPBACK, _sample_rank, link_meta, sampling_link
from dsp.launch import RankPool
from dsp.sample import SampleConfig


def configs(args) -> list:
    """``(name, N, SampleConfig)`` per variant: one process first, then per N each strategy."""
    over = {k: v for k, v in (("hidden_size", args.hidden), ("num_heads", args.heads),
                              ("depth", args.depth)) if v is not None}  # fmt: skip
    base = dict(model=args.model, model_overrides=over, frames=args.frames, height=args.height,
                width=args.width, prompts=args.prompt or ["red circle left"], steps=args.steps,
                cfg_scale=args.cfg_scale, seed=0)  # fmt: skip
    out = [("one process", 1, SampleConfig(strategy="none", **base))]
    for n in args.world_size:
        out += [(s, n, SampleConfig(strategy=s, **base)) for s in args.strategy]
    return out


@contextlib.contextmanager
def pools(args, variants):
    """``({N: pool}, {N: link meta})``: the one-rank pool and, per N, one on the link."""
    with contextlib.ExitStack() as stack:
        got = {1: stack.enter_context(RankPool(1, timeout=600))}
        links = {1: {"description": "one process", "emulated": False}}
        for n in args.world_size:
            cfg = next(c for _, m, c in variants if m == n)
            if args.link in LOOPBACK:
                got[n] = stack.enter_context(RankPool(n, timeout=600))
                links[n] = {"description": "plain loopback", "emulated": False}
            else:
                dsp_cfg = SampleConfig(**{**vars(cfg), "strategy": "dsp"})
                cal = stack.enter_context(sampling_link(dsp_cfg, n, args.link, timeout=600))
                got[n], links[n] = cal.pool, link_meta(cal)
        yield got, links


def run_once(pool, cfg) -> dict:
    t0 = time.perf_counter()
    per_rank = pool.run(_sample_rank, cfg)
    wall = time.perf_counter() - t0
    res = per_rank[0]
    return {
        "sampling_s": max(r["total_s"] for r in res.ranks),
        "wall_s": wall,
        "bytes_per_step": max(r["bytes_per_step"] for r in res.ranks),
        "latents": res.latents,
        "layout": res.layout,
    }


def measure(args) -> tuple:
    variants = configs(args)
    runs = {i: [] for i in range(len(variants))}
    with pools(args, variants) as (got, links):
        for name, n, cfg in variants:  # warm-up: imports, planner, first allocations
            run_once(got[n], SampleConfig(**{**vars(cfg), "steps": 1}))
            print(f"warm: {name} N={n}", file=sys.stderr, flush=True)
        for r in range(args.rounds):
            order = list(range(len(variants)))
            order = order[r % len(order) :] + order[: r % len(order)]
            for i in order:
                name, n, cfg = variants[i]
                runs[i].append(run_once(got[n], cfg))
                took = runs[i][-1]["sampling_s"]
                print(f"round {r + 1}/{args.rounds} {name} N={n}: {took:.3f} s", file=sys.stderr,
                      flush=True)  # fmt: skip
    ref = runs[0][0]["latents"]
    rows = []
    for i, (name, n, cfg) in enumerate(variants):
        s = [x["sampling_s"] for x in runs[i]]
        diff = max((x["latents"] - ref).abs().max().item() for x in runs[i])
        rows.append({
            "variant": name, "strategy": cfg.strategy, "world_size": n, "steps": cfg.steps,
            "sampling_s": {"median": statistics.median(s), "min": min(s), "max": max(s),
                           "all": s},
            "per_step_s": statistics.median(s) / cfg.steps,
            "wall_s": statistics.median(x["wall_s"] for x in runs[i]),
            "bytes_per_step": runs[i][0]["bytes_per_step"],
            "max_latent_diff_vs_one_process": diff,
            "link": links[n].get("description"),
        })  # fmt: skip
    one = rows[0]["sampling_s"]["median"]
    for row in rows:
        row["speedup_vs_one_process"] = one / row["sampling_s"]["median"]
    for n in args.world_size:
        by = {r["strategy"]: r for r in rows if r["world_size"] == n}
        if "dsp" in by and "ulysses" in by:
            by["dsp"]["dsp_over_ulysses"] = (
                by["ulysses"]["sampling_s"]["median"] / by["dsp"]["sampling_s"]["median"]
            )
    return rows, links


def markdown(meta: dict, rows: list) -> str:
    c = meta["config"]
    over = ", ".join(f"{k}={v}" for k, v in c["model_overrides"].items()) or "defaults"
    lines = [
        "# Sampling latency: whole `dsp sample` runs, one process vs Ulysses vs DSP",
        "",
        f"- date {meta['date']}, host `{meta['host']}`, {meta['cpu']} ({meta['cpu_count']} "
        f"cores), {meta['platform']}",
        f"- python {meta['python']}, torch {meta['torch']}, dsp {meta['dsp']}, gloo, 1 thread "
        "per rank (the one-process reference too)",
        f"- load: `uptime` before: {meta['uptime_before']}; after: {meta['uptime_after']}",
        f"- model: random {c['model']} ({over}); video {c['frames']}x{c['height']}x{c['width']} "
        f"pixels = latent {c['latent']}; {c['steps']} Euler steps, CFG scale {c['cfg_scale']} "
        f"(cond and uncond forward per step), {c['prompts']} prompt(s), fp32",
        f"- {meta['rounds']} interleaved rounds after a one-step warm-up per variant",
        *[f"- link N={n}: {m['description']}" for n, m in meta["link"].items() if n != "1"],
        f"- command: `{meta['command']}`",
        "",
        "sampling s: median (min-max) over rounds of the slowest rank's whole sampling loop; "
        "wall s: the call from the launcher (adds model build, planning, result gathering); "
        "latent diff: max |latents - one process's| over the rounds",
        "",
        "| variant | N | sampling s | per step s | wall s | sent/step MiB | x one process | "
        "DSP / Ulysses | latent diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["sampling_s"]
        dou = f"{r['dsp_over_ulysses']:.2f}x" if "dsp_over_ulysses" in r else ""
        lines.append(
            f"| {r['variant']} | {r['world_size']} | {s['median']:.3f} ({s['min']:.3f}-"
            f"{s['max']:.3f}) | {r['per_step_s']:.3f} | {r['wall_s']:.2f} | "
            f"{r['bytes_per_step'] / 2**20:.2f} | {r['speedup_vs_one_process']:.2f}x | {dou} | "
            f"{r['max_latent_diff_vs_one_process']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list, path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return ""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['variant']}\nN={r['world_size']}" for r in rows]
    med = [r["sampling_s"]["median"] for r in rows]
    err = [[m - r["sampling_s"]["min"] for m, r in zip(med, rows)],
           [r["sampling_s"]["max"] - m for m, r in zip(med, rows)]]  # fmt: skip
    colours = {"none": "grey", "ulysses": "tab:orange", "dsp": "tab:blue"}
    cs = [colours.get(r["strategy"], "tab:green") for r in rows]
    ax.bar(range(len(rows)), med, yerr=err, color=cs, capsize=3)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set(ylabel="seconds (median, min-max)", title=f"whole sampling run ({rows[0]['steps']} "
           "steps)")  # fmt: skip
    bx.bar(range(len(rows)), [r["speedup_vs_one_process"] for r in rows], color=cs)
    bx.axhline(1.0, color="grey", lw=0.8)
    bx.set_xticks(range(len(rows)), labels, fontsize=7)
    bx.set(ylabel="one process latency / latency", title="speedup over one process")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="stdit-tiny")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--frames", type=int, default=16, help="video frames (default 16)")
    p.add_argument("--height", type=int, default=64, help="pixels (default 64: latent 32)")
    p.add_argument("--width", type=int, default=64, help="pixels (default 64: latent 32)")
    p.add_argument("--steps", type=int, default=10, help="Euler steps (default 10)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--prompt", action="append", default=None, help="repeatable")
    p.add_argument("--strategy", type=names, default=["ulysses", "dsp"])
    p.add_argument("--world-size", type=ints, default=[2, 4])
    p.add_argument("--link", default="ib", help="as dsp sample --link (default ib)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, N=2, 2 steps")
    p.add_argument("--json", default="sample_latency.json", help="JSON path; .md, .png beside")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden = args.heads = args.depth = None
        args.frames, args.height, args.width = 8, 16, 16
        args.steps, args.rounds, args.world_size = 2, 1, [2]
    meta = environment()
    meta.update(
        uptime_before=uptime(),
        command="python benchmarks/sample_latency.py "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        rounds=args.rounds,
    )
    rows, links = measure(args)
    meta["uptime_after"] = uptime()
    cfg = configs(args)[0][2]
    meta["config"] = {
        **{k: v for k, v in vars(cfg).items() if k not in ("checkpoint", "strategy")},
        "latent": f"{cfg.frames}x{cfg.height // 2}x{cfg.width // 2}",
        "prompts": len(cfg.prompts),
        "link": args.link,
        "world_size": args.world_size,
        "strategy": args.strategy,
    }
    meta["link"] = {str(n): m for n, m in links.items()}
    stem = os.path.splitext(args.json)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1, default=str)
    md = markdown(meta, rows)
    with open(stem + ".md", "w") as f:
        f.write(md)
    png = plot(rows, stem + ".png")
    print(md)
    print(f"wrote {args.json}, {stem}.md" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
