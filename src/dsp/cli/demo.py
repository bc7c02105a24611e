"""``dsp demo``: the resharding primitives on a video-shaped activation, verified and counted.

Spawns ``--world-size`` CPU ranks (gloo on loopback), runs
``split(T) -> switch(T->S) -> switch(S->T) -> gather(T)`` on a value-encoded ``(B, T, S, C)``
tensor with uneven T and S, checks that every element lands in place bit-exactly, and prints
the bytes each primitive sent next to its closed form.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist

import dsp
from dsp.cli.table import human_bytes, print_table
from dsp.launch import spawn


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="verify and count DSP's primitives on CPU ranks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--world-size", type=int, default=4, help="number of CPU ranks (default 4)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=4,
        default=[2, 13, 250, 64],
        metavar=("B", "T", "S", "C"),
        help="activation shape (default 2 13 250 64: uneven T and S over 4 ranks)",
    )
    p.set_defaults(func=run)


def _rank_job(shape):
    """Per-rank body: the four primitives, their bytes and the placement checks."""
    _, t_len, s_len, _ = shape
    full = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)  # value = index
    steps = {}
    with dsp.comm_log() as log:
        x_t = dsp.split(full, 1)  # (B, T, S, C) -> (B, T/N, S, C)
    steps["split"] = (log.bytes_sent, tuple(x_t.shape))
    with dsp.comm_log() as log:
        x_s = dsp.switch(x_t, 1, 2, src_size=t_len)  # (B, T/N, S, C) -> (B, T, S/N, C)
    steps["switch T->S"] = (log.bytes_sent, tuple(x_s.shape))
    with dsp.comm_log() as log:
        x_t2 = dsp.switch(x_s, 2, 1, src_size=s_len)  # (B, T, S/N, C) -> (B, T/N, S, C)
    steps["switch S->T"] = (log.bytes_sent, tuple(x_t2.shape))
    with dsp.comm_log() as log:
        out = dsp.gather(x_t2, 1, size=t_len)  # (B, T/N, S, C) -> (B, T, S, C)
    steps["gather"] = (log.bytes_sent, tuple(out.shape))
    exact = (
        torch.equal(x_s, dsp.local_shard(full, 2))
        and torch.equal(x_t2, x_t)
        and torch.equal(out, full)
    )
    return {"rank": dist.get_rank(), "steps": steps, "exact": exact}


def _formula(step, shape, n, r, es):
    b, t, s, c = shape
    tr, sr = dsp.shard_sizes(t, n)[r], dsp.shard_sizes(s, n)[r]
    if step == "split":
        return 0
    if step == "switch T->S":
        return b * tr * (s - sr) * c * es
    if step == "switch S->T":
        return b * sr * (t - tr) * c * es
    return b * tr * s * c * es * (n - 1)


def run(args) -> int:
    shape, n = tuple(args.shape), args.world_size
    if n < 1 or min(shape) < 1:
        raise SystemExit(f"dsp demo: need world size >= 1 and positive sizes, got {n}, {shape}")
    es = 8
    full_bytes = math.prod(shape) * es
    print(
        f"dsp demo: {n} CPU ranks, activation (B, T, S, C) = {shape} float64, "
        f"M = {human_bytes(full_bytes)}, T shards {dsp.shard_sizes(shape[1], n)}, "
        f"S shards {dsp.shard_sizes(shape[2], n)}"
    )
    results = spawn(_rank_job, n, shape)
    rows = []
    for step in ("split", "switch T->S", "switch S->T", "gather"):
        sent = [res["steps"][step][0] for res in results]
        want = [_formula(step, shape, n, r, es) for r in range(n)]
        if sent != want:
            raise SystemExit(f"dsp demo: {step} sent {sent} bytes per rank, formula {want}")
        rows.append(
            [
                step,
                str(results[0]["steps"][step][1]),
                human_bytes(min(sent)),
                human_bytes(max(sent)),
                human_bytes(sum(sent)),
                f"{sum(sent) / full_bytes:.3f} M",
                "yes",
            ]
        )
    print_table(
        "bytes sent per primitive (measured by dsp.comm_log)",
        [
            "primitive",
            "rank-0 shape after",
            "min/rank",
            "max/rank",
            "all ranks",
            "all / M",
            "= formula",
        ],
        rows,
    )
    exact = all(res["exact"] for res in results)
    print(f"bit-exact placement and round trip on every rank: {'yes' if exact else 'NO'}")
    print(
        f"a switch moves (N-1)/N of M in total ({(n - 1) / n:.3f} M here), "
        "a gather (N-1) M: DSP switches inside the model and gathers only at the exit."
    )
    return 0 if exact else 1
