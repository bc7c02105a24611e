"""Bytes sent and saved-activation bytes per rank, per strategy, for one STDiT training step.

Runs each strategy on N CPU ranks (gloo), records ``dsp.comm_log()`` bytes for the forward
and the backward and the activations autograd saves (``dsp.memory.saved_activations``), and
checks the bytes against the closed forms of docs/communication.md.

Usage:
    python benchmarks/strategy_table.py --model stdit-tiny --world-size 2 4 \
        --shape 1 16 16 16 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys

import torch

import dsp
from dsp.launch import RankPool
from dsp.memory import saved_activations
from dsp.models import build_model
from dsp.strategies import get_strategy
from dsp.strategies.volume import expected_bytes

STRATEGIES = ["dsp", "ulysses", "ring", "megatron_sp", "usp"]


def rank_job(model_name, strategy, shape, text_len=8):
    b, t, h, w = shape
    torch.manual_seed(0)
    model = build_model(model_name, zero_init=False)
    c = model.config
    x = torch.randn(b, c.in_channels, t, h, w)
    y = torch.randn(b, text_len, c.caption_channels)
    ts = torch.randint(0, 1000, (b,))
    if strategy != "single":
        get_strategy(strategy).apply(model)
    with dsp.comm_log() as log, saved_activations(model.parameters()) as saved:
        out = model(x, ts, y)
    with dsp.comm_log() as blog:
        out.square().mean().backward()
    return {"forward": log.sent(), "backward": blog.sent(), "saved": saved.bytes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="stdit-tiny")
    p.add_argument("--world-size", type=int, nargs="+", default=[2, 4])
    p.add_argument(
        "--shape", type=int, nargs=4, default=[1, 16, 16, 16], metavar=("B", "T", "H", "W")
    )
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    shape = tuple(args.shape)
    with RankPool(1) as pool:
        single = pool.run(rank_job, args.model, "single", shape)[0]
    rows = []
    model = build_model(args.model)
    patches = (shape[2] // 2) * (shape[3] // 2)
    for n in args.world_size:
        with RankPool(n) as pool:
            for s in STRATEGIES:
                res = pool.run(rank_job, args.model, s, shape)
                want = [
                    expected_bytes(
                        s,
                        model,
                        batch=shape[0],
                        frames=shape[1],
                        patches=patches,
                        world_size=n,
                        rank=r,
                        elem_size=4,
                    )
                    for r in range(n)
                ]
                kw = dict(
                    batch=shape[0],
                    frames=shape[1],
                    patches=patches,
                    world_size=n,
                    rank=0,
                    elem_size=4,
                )
                layer = (
                    expected_bytes(s, build_model(args.model, depth=2), **kw)["forward"]
                    - expected_bytes(s, build_model(args.model, depth=1), **kw)["forward"]
                )
                ok = all(
                    res[r]["forward"] == want[r]["forward"]
                    and res[r]["backward"] == want[r]["backward"]
                    for r in range(n)
                )
                rows.append(
                    {
                        "world_size": n,
                        "strategy": s,
                        "bytes_forward": max(r["forward"] for r in res),
                        "bytes_backward": max(r["backward"] for r in res),
                        "bytes_forward_per_layer_rank0": layer,
                        "saved_activation_bytes": max(r["saved"] for r in res),
                        "saved_vs_single": max(r["saved"] for r in res) / single["saved"],
                        "matches_formula": ok,
                    }
                )
                print(rows[-1], flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = {
        "benchmark": "strategy_table",
        "date": date,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "dsp": dsp.__version__,
        "model": args.model,
        "depth": model.config.depth,
        "shape_BTHW": shape,
        "patches_per_frame": patches,
        "dtype": "float32",
        "single_process_saved_bytes": single["saved"],
    }
    os.makedirs(args.out, exist_ok=True)
    stem = f"strategies_{args.model.replace('/', '-')}_{meta['host']}_{date[:10]}"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    kib = 1024
    md = [
        f"# Bytes and saved activations per rank: {args.model}",
        "",
        f"- {date}, host {meta['host']} ({meta['cpu_count']} cores), torch {meta['torch']}, "
        f"dsp {meta['dsp']}, gloo on loopback",
        f"- {args.model} (depth {meta['depth']}), input (B, T, H, W) = {shape} -> T = "
        f"{shape[1]}, S = {patches}, float32, one forward + backward, text length 8",
        "- fwd/layer: one STDiT layer's forward bytes (rank 0, the formula, measured totals "
        "checked against it); fwd/bwd per rank: the whole step, model entry and exit included",
        f"- single process saves {single['saved'] / kib:.0f} KiB of activations",
        f"- command: `python benchmarks/strategy_table.py --model {args.model} --world-size "
        f"{' '.join(map(str, args.world_size))} --shape {' '.join(map(str, shape))}`",
        "",
        "| N | strategy | fwd KiB/layer | fwd KiB/rank | bwd KiB/rank | saved KiB/rank "
        "| saved / single | = formula |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['world_size']} | {r['strategy']} | "
            f"{r['bytes_forward_per_layer_rank0'] / kib:.1f} | "
            f"{r['bytes_forward'] / kib:.1f} | "
            f"{r['bytes_backward'] / kib:.1f} | {r['saved_activation_bytes'] / kib:.0f} | "
            f"{r['saved_vs_single']:.3f} | {'yes' if r['matches_formula'] else 'NO'} |"
        )
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
