"""``torch.compile`` on a DSP-parallelized model: step time eager vs compiled, side by side.

    python benchmarks/compile_step.py [--world-size 2] [--backend inductor] [--repeats 7]

Per rank: stdit-tiny widened to hidden 256, 8 heads, depth 2, fp32, one training step
(forward, backward) on 16 latent frames of 32 x 32, DSP's planner plan (blocking and with
2 overlapped chunks). The same process times the eager model and its compiled twin in
alternation (median over repeats, the slowest rank per step), after a warm-up that compiles.
Writes ``benchmarks/results/compile_<host>_<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dsp.launch import RankPool
from dsp.models import build_model
from dsp.strategies import get_strategy


def rank_body(backend: str, repeats: int, chunks: int):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build_model("stdit-tiny", zero_init=False, hidden_size=256, num_heads=8, depth=2)
    x = torch.randn(1, 4, 16, 32, 32)
    t, y = torch.tensor([3]), torch.randn(1, 16, 16)
    twin = copy.deepcopy(model)
    get_strategy("dsp", None, chunks=chunks).apply(model, (x, t, y))
    get_strategy("dsp", None, chunks=chunks).apply(twin, (x, t, y))
    counters.clear()
    compiled = torch.compile(twin, backend=backend)

    def step(m):
        t0 = time.perf_counter()
        m(x, t, y).square().mean().backward()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    step(compiled)
    compile_s = time.perf_counter() - t0
    step(model)
    eager, comp = [], []
    for _ in range(repeats):
        eager.append(step(model))
        comp.append(step(compiled))
    return {
        "eager": eager,
        "compiled": comp,
        "first_call_s": compile_s,
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    rows = []
    with RankPool(args.world_size, timeout=1800) as pool:
        for chunks in (1, 2):
            res = pool.run(rank_body, args.backend, args.repeats, chunks)
            slow = {
                k: statistics.median(max(r[k][i] for r in res) for i in range(args.repeats))
                for k in ("eager", "compiled")
            }
            rows.append(
                {
                    "chunks": chunks,
                    "eager_s": slow["eager"],
                    "compiled_s": slow["compiled"],
                    "speedup": slow["eager"] / slow["compiled"],
                    "first_call_s": max(r["first_call_s"] for r in res),
                    "graphs": res[0]["graphs"],
                    "graph_breaks": res[0]["breaks"],
                }
            )
    import os

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "torch": torch.__version__,
        "world_size": args.world_size,
        "backend": args.backend,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "config": "stdit-tiny, hidden 256, 8 heads, depth 2, fp32, 16 x 32 x 32 latents, train",
    }
    day = meta["date"][:10]
    out = Path("benchmarks/results") / f"compile_{meta['host']}_{day}"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    lines = [
        "# torch.compile on a DSP-parallelized model",
        "",
        f"`python benchmarks/compile_step.py --world-size {args.world_size} --backend "
        f"{args.backend} --repeats {args.repeats}` on {meta['date']} ({meta['host']}, torch "
        f"{meta['torch']}, gloo, 1 thread per rank; load average "
        f"{', '.join(f'{v:.1f}' for v in meta['load_average'])}). {meta['config']}; eager and "
        "compiled twins timed in alternation in the same processes; medians of the slowest "
        "rank's step.",
        "",
        "| DSP plan | eager step s | compiled step s | speedup | first call s | graphs | "
        "graph breaks |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        plan = "blocking" if r["chunks"] == 1 else f"{r['chunks']} overlapped chunks"
        lines.append(
            f"| {plan} | {r['eager_s']:.3f} | {r['compiled_s']:.3f} | {r['speedup']:.2f}x | "
            f"{r['first_call_s']:.0f} | {r['graphs']} | {r['graph_breaks']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
