"""The switch's pack and unpack (the copies around its all-to-all) against a plain copy of the
same bytes and against DeepSpeed-Ulysses' layout functions, on one process (no network).

Cases are Ulysses' two all-to-alls on ``(B, S, H, D)`` tensors (DeepSpeed's layout,
``batch_dim_idx=0``): q/k/v sequence -> heads (DeepSpeed ``scatter_idx=2``) and the
attention output heads -> sequence (``scatter_idx=1``), exactly as the engine's heads stage
switches them (it receives sdpa's ``(B, H, S, D)`` views of the projections' ``(B, S, H, D)``
and switches them in that memory order); plus q, k, v packed into one buffer
(``switch_many``, the ``qkv_one_all_to_all`` option) against three plain copies. Pack is what
runs before the all-to-all, unpack what runs after it on the received buffer of this rank.
Variants run interleaved, in a shuffled order each round (every variant sees the same load),
one thread; times are medians, ratios the median of the rounds' paired ratios with a 95%
interval. Split sizes and layout parameters are worked out in the timed pack, for ours and
DeepSpeed's alike (each computes them once per all-to-all and uses them on both sides).

DeepSpeed is optional (``pip install deepspeed==0.19.8`` into the environment running this
script; the package does not depend on it): without it the DeepSpeed columns are empty.

    python benchmarks/pack_unpack.py --out benchmarks/results/pack_unpack_vm_DATE
    python benchmarks/pack_unpack.py --device cuda --dtype bfloat16 --out ...   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from dsp.bench.report import uptime
from dsp.comm.primitives import _pack, _unpack
from dsp.comm.shards import shard_sizes

SHAPES = [(1, 4096, 16, 64), (2, 2048, 16, 64), (1, 2048, 12, 72)]  # full B, S, H, D
#: DSP's own switches of a (B, T, S, C) stream between frames and tokens: full sizes
DSP_SHAPES = [(1, 16, 1024, 256), (2, 16, 512, 256), (1, 15, 300, 384)]
WORLD_SIZES = [2, 4]


def _deepspeed():
    try:
        import deepspeed
        from deepspeed.sequence import layer  # noqa: F401

        return layer, deepspeed.__version__
    except Exception as e:  # noqa: BLE001 - optional; the report says why it is missing
        return None, f"not available: {type(e).__name__}: {e}".splitlines()[0]


#: calls per timing on a GPU: one copy of a few MiB takes microseconds there, about what a
#: launch and a synchronize cost, so a timing covers this many back-to-back calls
GPU_CALLS = 20


def _time(fn: Callable[[], object]) -> float:
    """Seconds one call takes: on a CPU one call by the wall clock; on a GPU the mean of
    ``GPU_CALLS`` calls in a row between two CUDA events (the copies, not their launches)."""
    if torch.get_default_device().type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(GPU_CALLS):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / GPU_CALLS


def median_ci(values: List[float], z: float = 1.96) -> List[float]:
    """A distribution-free 95% confidence interval of the median (order statistics): the
    ranks ``(n-1)/2 -+ z sqrt(n)/2`` of the sorted values (binomial, normal approximation)."""
    v, n = sorted(values), len(values)
    mid, half = (n - 1) / 2, z * math.sqrt(n) / 2  # the median's 0-based rank, and the spread
    lo = max(int(math.floor(mid - half)), 0)
    hi = min(int(math.ceil(mid + half)), n - 1)
    return [v[lo], v[hi]]


def _tensors(v: object) -> List[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors(x)]
    return []


def copies(fn: Callable[[], object]) -> bool:
    """Whether a variant writes new memory: some tensor it returns does not share storage
    with a tensor the variant reads (its closure's)."""
    reads = {
        t.untyped_storage().data_ptr()
        for c in fn.__closure__ or ()
        for t in _tensors(c.cell_contents)
    }
    return any(t.untyped_storage().data_ptr() not in reads for t in _tensors(fn()))


def _input_bytes(clone: Callable[[], object]) -> int:
    """Bytes a case moves: those its ``clone`` variant copies (one rank's input)."""
    return sum(t.numel() * t.element_size() for t in _tensors(clone()))


def cases(b: int, s: int, h: int, d: int, n: int, ds) -> Dict[str, Dict[str, Callable]]:
    """Per case: the variants to time (ours, DeepSpeed's, a clone of the same bytes)."""
    out: Dict[str, Dict[str, Callable]] = {}
    s_r, h_r = s // n, h // n
    # Sizes and layouts are worked out once per switch and timed with the pack, for both:
    # DeepSpeed's single_all_to_all computes its layout parameters once for pre and post.
    s_sz, h_sz = shard_sizes(s, n), shard_sizes(h, n)
    # q/k/v, sequence -> heads: this rank holds (B, S/N, H, D), gets (B, S, H/N, D)
    x = torch.randn(b, s_r, h, d)
    recv = torch.randn(b * s * h_r * d)  # what the all-to-all delivers (N blocks of the same size)
    shape_out = [b, s, h_r, d]
    seq_in = {
        "ours_pack": lambda: _pack([x], 2, [shard_sizes(h, n)], n),
        "ours_unpack": lambda: _unpack(recv, [shape_out], 1, [s_sz], n),
        "clone": lambda: x.clone(),
    }
    if ds is not None:  # as single_all_to_all runs them: layout parameters, pre, post
        post = ds.post_all2all(*ds._generate_layout_params(2, 0, n, x)[2:])
        recv_ds = recv.view(n, b, s_r, h_r, d)  # DeepSpeed receives (N, B, S/N, H/N, D)
        seq_in["ds_pack"] = lambda: ds.pre_all2all_fun(
            *ds._generate_layout_params(2, 0, n, x)[:2], x
        )
        seq_in["ds_unpack"] = lambda: post(recv_ds)
    out["q/k/v seq->heads"] = seq_in
    # attention output, heads -> sequence: this rank holds (B, S, H/N, D), gets (B, S/N, H, D)
    o = torch.randn(b, s, h_r, d)
    recv_o = torch.randn(b * s_r * h * d)
    heads_out = {
        "ours_pack": lambda: _pack([o], 1, [shard_sizes(s, n)], n),
        "ours_unpack": lambda: _unpack(recv_o, [[b, s_r, h, d]], 2, [h_sz], n),
        "clone": lambda: o.clone(),
    }
    if ds is not None:
        post2 = ds.post_all2all(*ds._generate_layout_params(1, 0, n, o)[2:])
        recv_o_ds = recv_o.view(n, b, s_r, h_r, d)
        heads_out["ds_pack"] = lambda: ds.pre_all2all_fun(
            *ds._generate_layout_params(1, 0, n, o)[:2], o
        )
        heads_out["ds_unpack"] = lambda: post2(recv_o_ds)
    out["out heads->seq"] = heads_out
    # q, k, v in one all-to-all against three plain copies (DeepSpeed has no such path)
    qkv = [torch.randn(b, s_r, h, d) for _ in range(3)]
    recv3 = torch.randn(3 * b * s * h_r * d)
    out["qkv in one seq->heads"] = {
        "ours_pack": lambda: _pack(qkv, 2, [shard_sizes(h, n)] * 3, n),
        "ours_unpack": lambda: _unpack(recv3, [shape_out] * 3, 1, [s_sz] * 3, n),
        "clone": lambda: [t.clone() for t in qkv],
    }
    return out


def dsp_cases(b: int, t: int, s: int, c: int, n: int) -> Dict[str, Dict[str, Callable]]:
    """DSP's switch of a ``(B, T, S, C)`` stream from frames to tokens and back (uneven sizes
    split as ``torch.tensor_split``): what the temporal attention's switches copy."""
    t_sz, s_sz = shard_sizes(t, n), shard_sizes(s, n)
    x = torch.randn(b, t_sz[0], s, c)  # rank 0: its frames, every token
    recv_t = torch.randn(b * t * s_sz[0] * c)  # N blocks of (B, T_j, S_0, C)
    y = torch.randn(b, t, s_sz[0], c)  # rank 0: every frame, its tokens
    recv_s = torch.randn(b * t_sz[0] * s * c)
    return {
        "dsp frames->tokens": {
            "ours_pack": lambda: _pack([x], 2, [s_sz], n),
            "ours_unpack": lambda: _unpack(recv_t, [[b, t, s_sz[0], c]], 1, [t_sz], n),
            "clone": lambda: x.clone(),
        },
        "dsp tokens->frames": {
            "ours_pack": lambda: _pack([y], 1, [t_sz], n),
            "ours_unpack": lambda: _unpack(recv_s, [[b, t_sz[0], s, c]], 2, [s_sz], n),
            "clone": lambda: y.clone(),
        },
    }


def interleaved(variants: Dict[str, Callable], repeats: int) -> Dict[str, List[float]]:
    """Each variant's time per round; the variants run in a new order each round (a fixed
    rotation would give each variant the same predecessor and its cache state)."""
    times: Dict[str, List[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm up allocator and caches
        fn()
    order = random.Random(0)
    for _ in range(repeats):
        keys = list(variants)
        order.shuffle(keys)
        for k in keys:
            times[k].append(_time(variants[k]))
    return times


def paired(times: Dict[str, List[float]], a: str, b: str) -> Tuple[float, List[float]]:
    """The median of the rounds' ratios a / b (both timed in the same round) and its 95%
    interval."""
    ratios = [x / y for x, y in zip(times[a], times[b])]
    return statistics.median(ratios), median_ci(ratios)


def run(repeats: int, shapes, world_sizes, dsp_shapes=()) -> List[dict]:
    ds, _ = _deepspeed()
    rows = []
    todo = [(shape, n, cases(*shape, n, ds)) for shape in shapes for n in world_sizes]
    todo += [(shape, n, dsp_cases(*shape, n)) for shape in dsp_shapes for n in world_sizes]
    for shape, n, by_case in todo:
        for name, variants in by_case.items():
            times = interleaved(variants, repeats)
            row = {"case": name, "shape": "x".join(map(str, shape)), "N": n}
            row["mib"] = _input_bytes(variants["clone"]) / 2**20
            row.update({f"{k}_s": statistics.median(v) for k, v in times.items()})
            row.update({f"{k}_copies": copies(fn) for k, fn in variants.items()})
            pairs = [("pack_over_clone", "ours_pack", "clone")]
            pairs += [("unpack_over_clone", "ours_unpack", "clone")]
            if "ds_pack" in times:
                pairs += [("pack_over_ds", "ours_pack", "ds_pack")]
                pairs += [("unpack_over_ds", "ours_unpack", "ds_unpack")]
            for key, a, b in pairs:
                row[key], row[key + "_ci"] = paired(times, a, b)
            rows.append(row)
            print(json.dumps(row))
    return rows


#: the sweep: a 2-way split of rows of 512 elements (Ulysses' q/k/v pack of 16 heads of 64 at
#: N = 2) by size, then 2 MiB by the length of the rows (the runs the copy moves at once)
SWEEP = [(mib, 512) for mib in (1, 2, 4, 8, 16, 32)] + [(2, run) for run in (64, 128, 256, 2048)]


def sweep(repeats: int, points: Sequence[Tuple[int, int]] = SWEEP, n: int = 2):
    """The strided copy a pack makes against a contiguous copy of the same bytes, into the
    same preallocated buffer (no allocation), by size and run length: where the gap comes
    from."""
    rows = []
    for mib, run_len in points:
        rows_n = mib * 2**20 // (torch.get_default_dtype().itemsize * n * run_len)
        x = torch.randn(rows_n, n, run_len)
        out = torch.empty(n, rows_n, run_len)
        times = interleaved(
            {
                "strided": lambda x=x, out=out: out.copy_(x.transpose(0, 1)),
                "contiguous": lambda x=x, out=out: out.view(-1).copy_(x.view(-1)),
            },
            repeats,
        )
        ratio, ci = paired(times, "strided", "contiguous")
        row = {"mib": mib, "N": n, "run": run_len, "ratio": ratio, "ratio_ci": ci}
        row.update({f"{k}_s": statistics.median(v) for k, v in times.items()})
        rows.append(row)
        print(json.dumps(row))
    return rows


def sweep_markdown(rows: List[dict]) -> List[str]:
    lines = [
        "",
        "## The strided copy by size and run length",
        "",
        f"A {rows[0]['N']}-way split of rows (runs of contiguous elements) into a preallocated "
        "buffer, against a contiguous copy of the same bytes into the same buffer.",
        "",
        "| MiB | run (elements) | strided ms | contiguous ms | strided / contiguous |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["ratio_ci"]
        lines.append(
            f"| {r['mib']} | {r['run']} | {_ms(r['strided_s'])} | {_ms(r['contiguous_s'])} | "
            f"{r['ratio']:.2f} ({lo:.2f}-{hi:.2f}) |"
        )
    return lines


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"


def _t(row: dict, key: str) -> str:
    if key + "_s" not in row:
        return "-"
    return _ms(row[key + "_s"]) + ("" if row[key + "_copies"] else " (view)")


def _r(row: dict, key: str) -> str:
    """A paired ratio with its 95% interval: ``1.05 (0.98-1.12)``."""
    if key not in row:
        return "-"
    lo, hi = row[key + "_ci"]
    return f"{row[key]:.2f} ({lo:.2f}-{hi:.2f})"


def summary(rows: List[dict]) -> List[str]:
    """The targets, read off the rows where a copy is made (a view is not a copy to time)."""
    out = []
    for side in ("pack", "unpack"):
        copied = [r for r in rows if r[f"ours_{side}_copies"]]
        over = [r for r in copied if r[f"{side}_over_clone_ci"][0] > 1.2]
        out.append(
            f"- {side}, where it copies ({len(copied)} cases): <= 1.2x a clone, or not told "
            f"apart from 1.2x, in {len(copied) - len(over)}; above it with 95% confidence in "
            f"{len(over)}"
            + (" (" + ", ".join(f"{r['case']} {r['shape']} N={r['N']}" for r in over) + ")")
            * bool(over)
        )
        vs_ds = [r for r in copied if r.get(f"ds_{side}_copies")]
        if vs_ds:
            slower = [r for r in vs_ds if r[f"{side}_over_ds_ci"][0] > 1.0]
            faster = [r for r in vs_ds if r[f"{side}_over_ds_ci"][1] < 1.0]
            out.append(
                f"- {side} vs DeepSpeed's where both copy ({len(vs_ds)} cases): slower with 95% "
                f"confidence in {len(slower)}, faster in {len(faster)}, not told apart in "
                f"{len(vs_ds) - len(slower) - len(faster)}"
            )
    return out


def markdown(meta: dict, rows: List[dict]) -> str:
    lines = [
        "# Switch pack / unpack against a plain copy and DeepSpeed-Ulysses' layout functions",
        "",
        f"- date {meta['date']}, {meta['cpu']} ({meta['cores']} cores), 1 thread; "
        f"device {meta['device']}, {meta['dtype']}",
        f"- torch {meta['torch']}, deepspeed {meta['deepspeed']}",
        f"- load: `uptime` before: {meta['uptime_before']}; after: {meta['uptime_after']}",
        f"- {meta['repeats']} interleaved rounds; times are medians; a ratio is the median of "
        "the rounds' ratios (both sides timed in the same round) with its 95% interval "
        "(order statistics); `clone` copies the bytes of one rank's input (three tensors for "
        "qkv in one), MiB is their size; `view` = no copy (the result shares the input's memory)",
        f"- command: `{meta['command']}`",
        "",
        *summary(rows),
        "",
        "| case | B x S x H x D (dsp: B x T x S x C) | N | MiB | ours pack ms | ours unpack ms | "
        "clone ms | pack / clone | unpack / clone | DS pack ms | DS unpack ms | pack / DS | "
        "unpack / DS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['N']} | {r['mib']:.1f} | "
            f"{_t(r, 'ours_pack')} | {_t(r, 'ours_unpack')} | {_ms(r['clone_s'])} | "
            f"{_r(r, 'pack_over_clone')} | {_r(r, 'unpack_over_clone')} | "
            f"{_t(r, 'ds_pack')} | {_t(r, 'ds_unpack')} | "
            f"{_r(r, 'pack_over_ds')} | {_r(r, 'unpack_over_ds')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--out", default="pack_unpack")
    p.add_argument("--quick", action="store_true", help="one small shape, N = 2 (smoke test)")
    p.add_argument("--device", default="cpu", help="where the tensors live: cpu (default), cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    torch.set_default_device(args.device)
    torch.set_default_dtype(getattr(torch, args.dtype))
    torch.set_num_threads(1)
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "deepspeed": _deepspeed()[1],
        "repeats": args.repeats,
        "uptime_before": uptime(),
        "command": "python benchmarks/pack_unpack.py "
        + " ".join(
            a
            for a in [
                f"--repeats {args.repeats}",
                "--quick" if args.quick else "",
                f"--device {args.device}" if args.device != "cpu" else "",
                f"--dtype {args.dtype}" if args.dtype != "float32" else "",
            ]
            if a
        ),
    }
    shapes, ns = ([(1, 256, 4, 16)], [2]) if args.quick else (SHAPES, WORLD_SIZES)
    rows = run(args.repeats, shapes, ns, [] if args.quick else DSP_SHAPES)
    by_size = sweep(args.repeats, [(1, 512)] if args.quick else SWEEP)
    meta["uptime_after"] = uptime()
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": rows, "size_sweep": by_size}, f, indent=1)
    md = markdown(meta, rows) + "\n".join(sweep_markdown(by_size)) + "\n"
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
