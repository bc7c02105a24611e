"""The switch's pack and unpack (the copies around its all-to-all) against a plain copy of the
same bytes and against DeepSpeed-Ulysses' layout functions, on one process (no network).

Cases are Ulysses' two all-to-alls on ``(B, S, H, D)`` tensors (DeepSpeed's layout,
``batch_dim_idx=0``): q/k/v sequence -> heads (DeepSpeed ``scatter_idx=2``) and the
attention output heads -> sequence (``scatter_idx=1``), exactly as the engine's heads stage
switches them (it receives sdpa's ``(B, H, S, D)`` views of the projections' ``(B, S, H, D)``
and switches them in that memory order); plus q, k, v packed into one buffer
(``switch_many``, the ``qkv_one_all_to_all`` option) against three plain copies. Pack is what
runs before the all-to-all, unpack what runs after it on the received buffer of this rank.
Times are medians of interleaved runs (every variant sees the same load), one thread.

DeepSpeed is optional (``pip install deepspeed==0.19.8`` into the environment running this
script; the package does not depend on it): without it the DeepSpeed columns are empty.

    python benchmarks/pack_unpack.py --out benchmarks/results/pack_unpack_vm_DATE
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

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


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cases(b: int, s: int, h: int, d: int, n: int, ds) -> Dict[str, Dict[str, Callable]]:
    """Per case: the variants to time (ours, DeepSpeed's, a clone of the same bytes)."""
    out: Dict[str, Dict[str, Callable]] = {}
    s_r, h_r = s // n, h // n
    # q/k/v, sequence -> heads: this rank holds (B, S/N, H, D), gets (B, S, H/N, D)
    x = torch.randn(b, s_r, h, d)
    recv = torch.randn(b * s * h_r * d)  # what the all-to-all delivers (N blocks of the same size)
    shape_out = [b, s, h_r, d]
    seq_in = {
        "ours_pack": lambda: _pack([x], 2, [shard_sizes(h, n)], n),
        "ours_unpack": lambda: _unpack(recv, [shape_out], 1, [shard_sizes(s, n)], n),
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
        "ours_unpack": lambda: _unpack(recv_o, [[b, s_r, h, d]], 2, [shard_sizes(h, n)], n),
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
        "ours_unpack": lambda: _unpack(recv3, [shape_out] * 3, 1, [shard_sizes(s, n)] * 3, n),
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


def run(repeats: int, shapes, world_sizes, dsp_shapes=()) -> List[dict]:
    ds, _ = _deepspeed()
    rows = []
    todo = [(shape, n, cases(*shape, n, ds)) for shape in shapes for n in world_sizes]
    todo += [(shape, n, dsp_cases(*shape, n)) for shape in dsp_shapes for n in world_sizes]
    for shape, n, by_case in todo:
        for name, variants in by_case.items():
            times: Dict[str, List[float]] = {k: [] for k in variants}
            for fn in variants.values():  # warm up allocator and caches
                fn()
            for i in range(repeats):  # interleaved, rotating the order
                keys = list(variants)
                keys = keys[i % len(keys) :] + keys[: i % len(keys)]
                for k in keys:
                    times[k].append(_time(variants[k]))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"case": name, "shape": "x".join(map(str, shape)), "N": n}
            row.update({f"{k}_s": v for k, v in med.items()})
            row["pack_over_clone"] = med["ours_pack"] / med["clone"]
            row["unpack_over_clone"] = med["ours_unpack"] / med["clone"]
            if "ds_pack" in med:
                row["pack_over_ds"] = med["ours_pack"] / med["ds_pack"]
                row["unpack_over_ds"] = med["ours_unpack"] / med["ds_unpack"]
            rows.append(row)
            print(json.dumps(row))
    return rows


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(meta: dict, rows: List[dict]) -> str:
    lines = [
        "# Switch pack / unpack against a plain copy and DeepSpeed-Ulysses' layout functions",
        "",
        f"- date {meta['date']}, {meta['cpu']} ({meta['cores']} cores), 1 thread, float32",
        f"- torch {meta['torch']}, deepspeed {meta['deepspeed']}",
        f"- load: `uptime` before: {meta['uptime_before']}; after: {meta['uptime_after']}",
        f"- median of {meta['repeats']} interleaved runs per variant; `clone` copies the bytes "
        "of one rank's input (three tensors for qkv in one); 0.00 ms = no copy (a view)",
        f"- command: `{meta['command']}`",
        "",
        "| case | B x S x H x D (dsp: B x T x S x C) | N | ours pack ms | ours unpack ms | "
        "clone ms | pack / clone | unpack / clone | DS pack ms | DS unpack ms | pack / DS | "
        "unpack / DS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['N']} | "
            f"{_ms(r['ours_pack_s'])} | {_ms(r['ours_unpack_s'])} | {_ms(r['clone_s'])} | "
            f"{_x(r['pack_over_clone'])} | {_x(r['unpack_over_clone'])} | "
            f"{_ms(r.get('ds_pack_s'))} | {_ms(r.get('ds_unpack_s'))} | "
            f"{_x(r.get('pack_over_ds'))} | {_x(r.get('unpack_over_ds'))} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--out", default="pack_unpack")
    p.add_argument("--quick", action="store_true", help="one small shape, N = 2 (smoke test)")
    args = p.parse_args()
    torch.set_num_threads(1)
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "deepspeed": _deepspeed()[1],
        "repeats": args.repeats,
        "uptime_before": uptime(),
        "command": "python benchmarks/pack_unpack.py "
        + " ".join(a for a in [f"--repeats {args.repeats}", "--quick" if args.quick else ""] if a),
    }
    shapes, ns = ([(1, 256, 4, 16)], [2]) if args.quick else (SHAPES, WORLD_SIZES)
    rows = run(args.repeats, shapes, ns, [] if args.quick else DSP_SHAPES)
    meta["uptime_after"] = uptime()
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    md = markdown(meta, rows)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
