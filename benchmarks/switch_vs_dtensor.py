"""Benchmark: ``dsp.switch`` vs DTensor ``redistribute(Shard(i) -> Shard(j))`` on CPU/gloo.

For a 5-D activation ``(B, T, H, W, C)`` sharded on T, both reshard to H. Per rank we record
bytes sent and the median time over repeats (each repeat starts after a barrier; the time of
a repeat is the slowest rank's). DTensor's bytes are counted from the c10d functional ops it
issues (captured with a dispatch mode), with the same convention as dsp's accounting layer:
payload handed to other ranks, not what a rank keeps.

Usage:
    python benchmarks/switch_vs_dtensor.py --world-size 2 4 --repeats 20 \
        --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import dsp
from dsp.launch import RankPool


class _C10dRecorder(TorchDispatchMode):
    """Records the c10d functional collectives DTensor issues and the bytes they send."""

    def __init__(self, group_size: int):
        super().__init__()
        self.n = group_size
        self.ops: list = []
        self.bytes_sent = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "_c10d_functional." in name and "wait_tensor" not in name and "wrap" not in name:
            t = args[0]
            b = t.numel() * t.element_size()
            if "all_gather" in name:
                sent = b * (self.n - 1)
            elif "all_to_all" in name:
                sent = b - b // self.n  # even splits: all but this rank's own block
            elif "reduce_scatter" in name:
                sent = b - b // self.n
            elif "all_reduce" in name:
                sent = 2 * b * (self.n - 1) // self.n
            else:
                raise RuntimeError(f"unaccounted DTensor collective {name}")
            self.ops.append(name.split(".")[1])
            self.bytes_sent += sent
        return func(*args, **(kwargs or {}))


def _time(fn, repeats: int, warmup: int) -> list:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, dt)  # benchmark bookkeeping only, not part of a switch
        times.append(max(float(g) for g in gathered))
    return times


def rank_job(shape, src, dst, repeats, warmup):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    n = dist.get_world_size()
    torch.manual_seed(0)
    full = torch.randn(shape)
    x_local = dsp.local_shard(full, src).contiguous()

    with dsp.comm_log() as log:
        y = dsp.switch(x_local, src, dst, src_size=shape[src])
    assert torch.equal(y, dsp.local_shard(full, dst))
    dsp_times = _time(lambda: dsp.switch(x_local, src, dst, src_size=shape[src]), repeats, warmup)

    mesh = init_device_mesh("cpu", (n,))
    xd = distribute_tensor(full, mesh, [Shard(src)])
    rec = _C10dRecorder(n)
    with rec:
        yd = xd.redistribute(mesh, [Shard(dst)]).to_local()
    assert torch.equal(yd, dsp.local_shard(full, dst))
    dt_times = _time(lambda: xd.redistribute(mesh, [Shard(dst)]).to_local(), repeats, warmup)
    return {
        "dsp_bytes_sent": log.bytes_sent,
        "dsp_ops": [r.op for r in log.records],
        "dsp_times_s": dsp_times,
        "dtensor_bytes_sent": rec.bytes_sent,
        "dtensor_ops": rec.ops,
        "dtensor_times_s": dt_times,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, nargs="+", default=[2, 4])
    p.add_argument(
        "--shape", type=int, nargs=5, default=[2, 16, 32, 32, 64], metavar=("B", "T", "H", "W", "C")
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    shape, src, dst = tuple(args.shape), 1, 2
    rows = []
    for n in args.world_size:
        print(f"world size {n}: switch T->H on {shape} float32 ...", flush=True)
        with RankPool(n, timeout=300) as pool:
            res = pool.run(rank_job, shape, src, dst, args.repeats, args.warmup)
        r0 = res[0]
        med_dsp = statistics.median(r0["dsp_times_s"])
        med_dt = statistics.median(r0["dtensor_times_s"])
        rows.append(
            {
                "world_size": n,
                "dsp_bytes_sent_per_rank": [r["dsp_bytes_sent"] for r in res],
                "dtensor_bytes_sent_per_rank": [r["dtensor_bytes_sent"] for r in res],
                "dsp_ops": r0["dsp_ops"],
                "dtensor_ops": r0["dtensor_ops"],
                "dsp_time_s": {
                    "median": med_dsp,
                    "min": min(r0["dsp_times_s"]),
                    "max": max(r0["dsp_times_s"]),
                },
                "dtensor_time_s": {
                    "median": med_dt,
                    "min": min(r0["dtensor_times_s"]),
                    "max": max(r0["dtensor_times_s"]),
                },
                "bytes_ratio": sum(r["dsp_bytes_sent"] for r in res)
                / sum(r["dtensor_bytes_sent"] for r in res),
                "time_ratio": med_dsp / med_dt,
            }
        )
    meta = {
        "benchmark": "switch_vs_dtensor",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "dsp": dsp.__version__,
        "backend": "gloo (loopback)",
        "threads_per_rank": 1,
        "config": {
            "shape_BTHWC": shape,
            "dtype": "float32",
            "src_dim": src,
            "dst_dim": dst,
            "activation_bytes": math.prod(shape) * 4,
            "repeats": args.repeats,
            "warmup": args.warmup,
        },
    }
    os.makedirs(args.out, exist_ok=True)
    stem = f"switch_vs_dtensor_{meta['host']}_{meta['date'][:10]}"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    md = [
        f"# dsp.switch vs DTensor redistribute (Shard({src}) -> Shard({dst}))",
        "",
        f"- date: {meta['date']}, host: {meta['host']}, {meta['processor']}, "
        f"{meta['cpu_count']} cores; {meta['platform']}",
        f"- python {meta['python']}, torch {meta['torch']}, dsp {meta['dsp']}; "
        "gloo on loopback, 1 thread per rank",
        f"- activation (B, T, H, W, C) = {shape} float32 = "
        f"{meta['config']['activation_bytes'] / 2**20:.1f} MiB; "
        f"{args.repeats} repeats after {args.warmup} warm-up; a repeat's time is the "
        "slowest rank's",
        f"- command: `python benchmarks/switch_vs_dtensor.py --world-size "
        f"{' '.join(map(str, args.world_size))} --shape {' '.join(map(str, shape))} "
        f"--repeats {args.repeats}`",
        "",
        "| N | dsp ops | DTensor ops | dsp bytes/rank | DTensor bytes/rank | bytes ratio | "
        "dsp median ms | DTensor median ms | time ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['world_size']} | {'+'.join(r['dsp_ops'])} | {'+'.join(r['dtensor_ops'])} | "
            f"{max(r['dsp_bytes_sent_per_rank']) / 2**20:.2f} MiB | "
            f"{max(r['dtensor_bytes_sent_per_rank']) / 2**20:.2f} MiB | "
            f"{r['bytes_ratio']:.3f} | {r['dsp_time_s']['median'] * 1e3:.1f} | "
            f"{r['dtensor_time_s']['median'] * 1e3:.1f} | {r['time_ratio']:.2f} |"
        )
    md += [
        "",
        "DTensor on a CPU (gloo) mesh has no all-to-all for Shard(i) -> Shard(j): it "
        "all-gathers the shard and keeps its chunk, sending (N-1) x the local shard per rank. "
        "dsp.switch sends only the blocks other ranks need, (N-1)/N x the local shard, so the "
        "byte ratio is 1/N.",
    ]
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
