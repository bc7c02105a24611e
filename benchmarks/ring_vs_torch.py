"""Our ring attention against torch's own ``_templated_ring_attention`` (context parallel), on
the same inputs, same bytes, same block kernel, CPU/gloo.

Both run non-causal attention over a sequence split in ``N`` equal blocks, forward and
backward, with torch's fused CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``
and its backward) on every block:

* ours: :func:`dsp.attention.ring.ring_attention` on ``(B, L_r, H, D)`` views of the same
  ``(B, H, L_r, D)`` tensors torch gets (sdpa's layout, as the engine calls it), autograd
  backward;
* torch: ``_templated_ring_attention`` / ``_templated_ring_attention_backward`` of
  ``torch.distributed.tensor.experimental._context_parallel._attention`` with that kernel as
  ``op``, ``seq_dim=2``, load balancing off (it is for causal masks), k/v rotated with
  ``_RotateMethod.ALL_TO_ALL`` (one ``permute_tensor`` per step, like our ``send_recv``).

Bytes: both send the k/v block N - 1 times in forward and again in backward, and the fp32
dk/dv accumulator N times; ours are counted by ``dsp.comm_log``, torch's from the c10d
functional collectives it issues (a dispatch mode), and the script checks they are equal, and
that the outputs and gradients agree. Time per repeat: the slowest rank's, after a barrier;
the variants alternate within each repeat, so both see the same load.

    python benchmarks/ring_vs_torch.py --world-size 2 3 \
        --out benchmarks/results/ring_vs_torch_vm_DATE
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsp.bench.report import uptime

SHAPES = [(1, 1024, 8, 64), (2, 1536, 8, 64), (1, 3072, 8, 64)]  # B, L (full), H, D


class _C10dBytes(TorchDispatchMode):
    """Bytes this rank hands to others in the c10d functional collectives torch issues."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank, self.bytes_sent, self.calls = rank, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "_c10d_functional.all_to_all_single" in name:
            t, _out_splits, in_splits = args[0], args[1], args[2]
            row = t.numel() // max(1, t.shape[0]) * t.element_size()
            self.bytes_sent += sum(s for j, s in enumerate(in_splits) if j != self.rank) * row
            self.calls += 1
        elif "_c10d_functional." in name and not any(w in name for w in ("wait", "wrap")):
            raise RuntimeError(f"unaccounted collective {name}")
        return func(*args, **(kwargs or {}))


def _barrier() -> None:
    from dsp.comm.collectives import all_reduce

    all_reduce(torch.zeros(1), tag="bench-barrier")


def rank_job(shape, repeats: int, warmup: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    import dsp
    from dsp.attention.ring import ring_attention

    n, r = dist.get_world_size(), dist.get_rank()
    b, length, h, d = shape
    l_r = length // n
    cp._cp_options.enable_load_balance = False  # it balances causal masks; ours has none
    cp._cp_options.rotate_method = cp._RotateMethod.ALL_TO_ALL
    group = dist.group.WORLD
    fwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    g = torch.Generator().manual_seed(r)
    q, k, v, dout = (torch.randn(b, h, l_r, d, generator=g) for _ in range(4))  # (B, H, L_r, D)

    def ours():
        qs, ks, vs = (t.transpose(1, 2).requires_grad_() for t in (q, k, v))  # (B, L_r, H, D)
        out = ring_attention(qs, ks, vs, group)
        out.backward(dout.transpose(1, 2))
        return out.transpose(1, 2), qs.grad.transpose(1, 2)

    def theirs():
        out, lse = cp._templated_ring_attention(group, 2, fwd_op, q, k, v, is_causal=False)
        dq, _dk, _dv = cp._templated_ring_attention_backward(
            group, 2, bwd_op, dout, "grad_out", q, k, v, out, lse, False, dropout_p=0.0
        )
        return out, dq

    # same results, same bytes
    with dsp.comm_log() as log:
        o1, dq1 = ours()
    with _C10dBytes(r) as rec:
        o2, dq2 = theirs()
    torch.testing.assert_close(o1, o2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dq1, dq2, atol=1e-4, rtol=1e-4)
    if log.bytes_sent != rec.bytes_sent:
        raise AssertionError(f"rank {r}: ours sent {log.bytes_sent} B, torch {rec.bytes_sent} B")
    times, cpu = {"ours": [], "torch": []}, {"ours": [], "torch": []}
    fns = {"ours": ours, "torch": theirs}
    for i in range(warmup + repeats):
        order = ["ours", "torch"] if i % 2 == 0 else ["torch", "ours"]
        for name in order:
            _barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {
        "times": times,
        "cpu": cpu,
        "bytes_ours": log.bytes_sent,
        "bytes_torch": rec.bytes_sent,
        "messages_ours": log.count(),
        "messages_torch": rec.calls,
    }


def main() -> None:
    from dsp.launch import RankPool

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world-size", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="ring_vs_torch")
    p.add_argument("--quick", action="store_true", help="one small shape (smoke test)")
    args = p.parse_args()
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads_per_rank": 1,
        "backend": "gloo (loopback)",
        "dtype": "float32",
        "repeats": args.repeats,
        "uptime_before": uptime(),
        "command": "python benchmarks/ring_vs_torch.py "
        + f"--world-size {' '.join(map(str, args.world_size))} --repeats {args.repeats}"
        + (" --quick" if args.quick else ""),
    }
    shapes = [(1, 240, 4, 32)] if args.quick else SHAPES
    rows = []
    for n in args.world_size:
        with RankPool(n, timeout=600) as pool:
            for shape in shapes:
                res = pool.run(rank_job, shape, args.repeats, args.warmup)
                slow = {
                    k: [max(ts) for ts in zip(*(x["times"][k] for x in res))]
                    for k in ("ours", "torch")
                }
                med = {k: statistics.median(v) for k, v in slow.items()}
                cpu = {  # CPU seconds of this rank's process (all its threads), largest rank
                    k: statistics.median(max(c) for c in zip(*(x["cpu"][k] for x in res)))
                    for k in ("ours", "torch")
                }
                row = {
                    "N": n,
                    "B": shape[0],
                    "L": shape[1],
                    "H": shape[2],
                    "D": shape[3],
                    "ours_s": med["ours"],
                    "torch_s": med["torch"],
                    "ours_over_torch": med["ours"] / med["torch"],
                    "ours_min_s": min(slow["ours"]),
                    "torch_min_s": min(slow["torch"]),
                    "ours_over_torch_min": min(slow["ours"]) / min(slow["torch"]),
                    "ours_cpu_s": cpu["ours"],
                    "torch_cpu_s": cpu["torch"],
                    "ours_over_torch_cpu": cpu["ours"] / cpu["torch"],
                    "ours_all": slow["ours"],
                    "torch_all": slow["torch"],
                    "bytes_sent_per_rank": [x["bytes_ours"] for x in res],
                    "messages_ours": res[0]["messages_ours"],
                    "messages_torch": res[0]["messages_torch"],
                }
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}))
    meta["uptime_after"] = uptime()
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    lines = [
        "# Ring attention: ours vs torch's `_templated_ring_attention` (forward + backward)",
        "",
        f"- date {meta['date']}, {meta['cpu']} ({meta['cores']} cores), 1 thread per rank, "
        f"{meta['backend']}, {meta['dtype']}, torch {meta['torch']}",
        f"- load: `uptime` before: {meta['uptime_before']}; after: {meta['uptime_after']}",
        f"- median over {args.repeats} repeats of the slowest rank's time (variants alternate "
        "within each repeat), and the ratio of the fastest repeats (min: the least disturbed "
        "by other load), and of the CPU seconds per call of a rank's process (median, largest "
        "rank; what each does, whatever else runs); same inputs, same block kernel; bytes "
        "checked equal per rank",
        f"- command: `{meta['command']}`",
        "",
        "| N | B x L x H x D | ours ms | torch ms | ours / torch | min: ours / torch | "
        "CPU: ours / torch | bytes sent per rank | messages ours / torch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['B']}x{r['L']}x{r['H']}x{r['D']} | {r['ours_s'] * 1e3:.1f} | "
            f"{r['torch_s'] * 1e3:.1f} | {r['ours_over_torch']:.3f} | "
            f"{r['ours_over_torch_min']:.3f} | {r['ours_over_torch_cpu']:.3f} | "
            f"{max(r['bytes_sent_per_rank'])} | {r['messages_ours']} / {r['messages_torch']} |"
        )
    md = "\n".join(lines) + "\n"
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
