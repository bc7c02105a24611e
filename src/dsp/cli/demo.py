"""``dsp demo``: DSP on a small STDiT across 4 CPU ranks, verified, counted and compared.

1. The primitives: split -> switch -> switch -> gather on a value-encoded (B, T, S, C) tensor
   with uneven T and S: every element lands in place, bytes equal their closed forms.
2. Correctness: DSP's output and every gradient equal the single-process run (fp64).
3. Comparison: DSP, Ulysses, Ring and Megatron-SP on a training step (emulated InfiniBand
   link where possible: root with ``ip`` and ``tc``), with bytes, step time and speedups.
   Writes ``dsp-report/`` (markdown, JSON and PNG plots).
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist

import dsp
from dsp.cli.errors import add_job_flags, apply_timeout
from dsp.cli.table import human_bytes, print_table
from dsp.launch import RankPool


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="verify and compare DSP with the baselines on CPU ranks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--world-size", type=int, default=4, help="number of CPU ranks (default 4)")
    p.add_argument("--quick", action="store_true", help="CI-sized: tiny shapes, plain loopback")
    p.add_argument(
        "--link", default=None, help="none | nvlink | ib | RATE (default: ib, or none with --quick)"
    )
    p.add_argument("--out", default="dsp-report", help="report directory (default dsp-report)")
    add_job_flags(p, timeout=120, what="demo")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------- primitives
def _primitives_job(shape):
    """Per-rank body: the four primitives, their bytes and the placement checks."""
    _, t_len, s_len, _ = shape
    full = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)  # value = index
    steps = {}
    with dsp.comm_log() as log:
        x_t = dsp.split(full, 1)  # (B, T, S, C) -> (B, T/N, S, C)
    steps["split"] = log.bytes_sent
    with dsp.comm_log() as log:
        x_s = dsp.switch(x_t, 1, 2, src_size=t_len)  # (B, T/N, S, C) -> (B, T, S/N, C)
    steps["switch T->S"] = log.bytes_sent
    with dsp.comm_log() as log:
        x_t2 = dsp.switch(x_s, 2, 1, src_size=s_len)  # (B, T, S/N, C) -> (B, T/N, S, C)
    steps["switch S->T"] = log.bytes_sent
    with dsp.comm_log() as log:
        out = dsp.gather(x_t2, 1, size=t_len)  # (B, T/N, S, C) -> (B, T, S, C)
    steps["gather"] = log.bytes_sent
    exact = (
        torch.equal(x_s, dsp.local_shard(full, 2))
        and torch.equal(x_t2, x_t)
        and torch.equal(out, full)
    )
    return {"rank": dist.get_rank(), "steps": steps, "exact": exact}


def _formula(step, shape, n, r, es):
    b, t, s, c = shape
    tr, sr = dsp.shard_sizes(t, n)[r], dsp.shard_sizes(s, n)[r]
    return {
        "split": 0,
        "switch T->S": b * tr * (s - sr) * c * es,
        "switch S->T": b * sr * (t - tr) * c * es,
        "gather": b * tr * s * c * es * (n - 1),
    }[step]


def primitives(pool: RankPool, shape) -> bool:
    n, es = pool.world_size, 8
    full_bytes = math.prod(shape) * es
    print(
        f"\n1. primitives on (B, T, S, C) = {shape} float64 (M = {human_bytes(full_bytes)}), "
        f"T shards {dsp.shard_sizes(shape[1], n)}, S shards {dsp.shard_sizes(shape[2], n)}"
    )
    results = pool.run(_primitives_job, shape)
    rows = []
    for step in ("split", "switch T->S", "switch S->T", "gather"):
        sent = [res["steps"][step] for res in results]
        want = [_formula(step, shape, n, r, es) for r in range(n)]
        rows.append(
            [
                step,
                human_bytes(max(sent)),
                human_bytes(sum(sent)),
                f"{sum(sent) / full_bytes:.3f} M",
                "yes" if sent == want else "NO",
            ]
        )
    print_table(
        "bytes sent per primitive (dsp.comm_log)",
        ["primitive", "max/rank", "all ranks", "all / M", "= formula"],
        rows,
    )
    ok = all(r["exact"] for r in results) and all(r[-1] == "yes" for r in rows)
    print(f"   bit-exact placement and round trip on every rank: {'yes' if ok else 'NO'}")
    return ok


# ----------------------------------------------------------------------------- the job
def run(args) -> int:
    from dsp.bench.calibrate import TARGETS, parse_rate
    from dsp.bench.report import environment, markdown, plot, speedups, write_json
    from dsp.bench.runner import BenchConfig, expand
    from dsp.bench.sweep import run_sweep
    from dsp.bench.verify import rank_verify
    from dsp.watchdog import check_local_world

    apply_timeout(args)
    n = args.world_size
    if n < 2:
        raise ValueError(f"--world-size must be >= 2, got {n}")
    check_local_world(n, force=args.force)
    quick = args.quick
    link = args.link or ("none" if quick else "ib")
    if link != "none" and link not in TARGETS:
        try:
            parse_rate(link)
        except ValueError as e:  # before any rank starts
            raise ValueError(
                f"--link {link!r}: expected none, {', '.join(TARGETS)} or a rate such as "
                f"25MB/s ({e})"
            ) from None
    model = "stdit-tiny"
    overrides = {} if quick else {"hidden": 128, "heads": 8, "depth": 2}
    frames, hw = (8, 16) if quick else (16, 32)
    print(
        f"dsp demo: {n} CPU ranks (gloo), model {model} {overrides or ''}, "
        f"latent video T={frames}, {hw}x{hw}, link {link}"
    )

    with RankPool(n) as pool:
        ok = primitives(pool, (2, 13, 250, 16) if quick else (2, 13, 250, 64))
        print("\n2. DSP vs the single process (fp64, output and every gradient)")
        mo = (
            {"hidden_size": overrides["hidden"], "num_heads": overrides["heads"], "depth": 2}
            if overrides
            else {}
        )
        res = pool.run(rank_verify, model, "dsp", (2, 5, 6, 10), mo)
        out_d = max(r["output_max_abs_diff"] for r in res)
        grad_d = max(r["grad_max_abs_diff"] for r in res)
        equal = out_d < 1e-9 and grad_d < 1e-9
        print(
            f"   T=5 frames, 3x5 patches (uneven over {n} ranks), 2 prompts of different "
            f"lengths: max |out - ref| = {out_d:.2e}, max |grad - ref| = {grad_d:.2e}: "
            f"{'equal' if equal else 'DIFFERENT'}"
        )
        ok = ok and equal

    print(
        f"\n3. training step (forward, backward, AdamW; the gradient all-reduce, the same for "
        f"every strategy, left out): DSP vs Ulysses, Ring, Megatron-SP (N = {n}, link {link})"
    )
    base = BenchConfig(
        model=model,
        world_size=n,
        frames=frames,
        height=hw,
        width=hw,
        warmup=1,
        repeats=2,
        grad_sync=False,  # the gradient all-reduce is the same for every SP strategy
        **overrides,
    )
    configs = expand(base, strategy=["dsp", "ulysses", "ring", "megatron_sp"])
    configs += expand(base, strategy=["none"], world_size=[1])
    rows, links = run_sweep(configs, link)
    table = []
    dsp_row = next(r for r in rows if r["strategy"] == "dsp")
    for r in rows:
        if r["error"]:
            table.append([r["strategy"], r["world_size"], "-", "-", "-", r["error"][:60]])
            continue
        sp = (dsp_row["samples_per_s"] / r["samples_per_s"]) if dsp_row["samples_per_s"] else 0
        table.append(
            [
                r["strategy"],
                r["world_size"],
                f"{r['step_time_s']['median']:.3f}",
                human_bytes(r["bytes_sent_forward"] + r["bytes_sent_backward"]),
                "(one process)" if r["world_size"] == 1 else f"{sp:.2f}x",
                "",
            ]
        )
    print_table(
        "one training step (median of repeats, slowest rank)",
        ["strategy", "N", "step s", "bytes/rank (fwd+bwd)", "DSP speedup", "error"],
        table,
    )
    os.makedirs(args.out, exist_ok=True)
    meta = environment()
    meta.update(
        command="dsp demo" + (" --quick" if quick else ""),
        link={
            "setting": link,
            "per_world_size": links,
            "description": "; ".join(f"N={k}: {v.get('description')}" for k, v in links.items()),
        },
    )
    write_json(os.path.join(args.out, "demo.json"), meta, rows)
    with open(os.path.join(args.out, "demo.md"), "w") as f:
        f.write(markdown(meta, rows, title="dsp demo"))
    pngs = plot(rows, args.out)
    for s in speedups(rows):
        print(
            f"   DSP over {s['baseline']}: {s['speedup']:.2f}x throughput, "
            f"{s['bytes_ratio']:.2f}x the bytes"
        )
    print(f"\nwrote {args.out}/demo.md, {args.out}/demo.json" + "".join(f", {p}" for p in pngs))
    if any(r["error"] for r in rows if r["strategy"] in ("dsp", "none")):
        ok = False
    return 0 if ok else 1
