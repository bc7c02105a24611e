"""One ring-attention block, forward + backward: torch's fused CPU kernel vs the einsum math.

Writes JSON and markdown (hardware, versions, config, medians of interleaved runs):
    python benchmarks/ring_block.py --out benchmarks/results/ring_block_vm_DATE
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import dsp.attention.ring as R

SHAPES = [(64, 32, 8, 32), (16, 128, 8, 32), (4, 512, 8, 64)]  # B, L, H, D


def once(fused: bool, q, k, v, do) -> float:
    orig = R._fused
    R._fused = (lambda x: True) if fused else (lambda x: False)
    try:
        scale = q.shape[-1] ** -0.5
        t0 = time.perf_counter()
        out, lse = R._block_forward(q, k, v, scale)
        R._block_backward(do, q, k, v, out, lse, scale)
        return time.perf_counter() - t0
    finally:
        R._fused = orig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="ring_block")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for b, length, h, d in SHAPES:
        q, k, v, do = (torch.randn(b, length, h, d) for _ in range(4))
        times = {True: [], False: []}
        for _ in range(args.repeats):  # interleaved: both see the same load
            for fused in (False, True):
                times[fused].append(once(fused, q, k, v, do))
        e, f = statistics.median(times[False]), statistics.median(times[True])
        rows.append(
            {
                "B": b,
                "L": length,
                "H": h,
                "D": d,
                "einsum_s": e,
                "fused_s": f,
                "einsum_over_fused": e / f,
            }
        )
    meta = {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": 1,
        "dtype": "float32",
        "repeats": args.repeats,
        "load_avg": os.getloadavg(),
    }
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=1)
    lines = [
        "# Ring attention block: fused CPU kernel vs einsum (forward + backward)",
        "",
        f"torch {meta['torch']}, {meta['cores']} cores, 1 thread, float32, median of "
        f"{args.repeats} interleaved runs, load average {meta['load_avg'][0]:.1f}",
        "",
        "| B | L | H | D | einsum ms | fused ms | einsum / fused |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['B']} | {r['L']} | {r['H']} | {r['D']} | {r['einsum_s'] * 1e3:.2f} | "
        f"{r['fused_s'] * 1e3:.2f} | {r['einsum_over_fused']:.2f} |"
        for r in rows
    ]
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
