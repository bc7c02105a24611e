"""Predictions at scale for docs/simulate.md: STDiT-XL/2 and XXL/2 training on 8 to 1024 H100s.

    python benchmarks/simulate_scale.py --out benchmarks/results/simulate

writes ``<out>/scale.json`` (every searched configuration's best mesh per strategy),
``<out>/scale.md`` (the tables docs/simulate.md quotes) and plots. Configuration: 8 H100 per
node (NVLink 4), 400 Gb/s InfiniBand per GPU across nodes, bf16, activation checkpointing,
ZeRO-2 over the dp x sp mesh, batch 1 per sp group, T5 text of 120 tokens, 64 x 64 spatial
tokens per frame (latent 128 x 128). For each strategy, GPU count and frame count the sp
degree (and for DSP across nodes the placement) is the one :func:`dsp.sim.search.search`
picks: the fastest per sample among those that fit in 80 GiB.
"""

from __future__ import annotations

import argparse
import json
import os

from dsp.sim.hardware import cluster
from dsp.sim.report import plot
from dsp.sim.search import search
from dsp.sim.step import simulate
from dsp.sim.workload import Workload

MODELS = ["stdit-xl/2", "stdit-xxl/2"]
STRATEGIES = ["dsp", "ulysses", "ring", "megatron_sp", "usp"]
GPUS = [8, 16, 32, 64, 128, 256, 512, 1024]
FRAMES = [64, 128, 256, 512, 1024]
FIT_FRAMES = [64 * 2**k for k in range(10)]  # 64 .. 32768: the longest video that fits

# The paper's configurations (PAPER.md): STDiT-XL/2, one node, batch 1 per SP group.
PAPER = [  # (sp, frames, tokens per side, {strategy: reported samples/s})
    (2, 64, 64, {"dsp": 0.98, "ulysses": 0.69}),
    (8, 64, 64, {}),
    (8, 128, 64, {}),
    (8, 256, 64, {"dsp": 0.885, "ulysses": 0.33}),
    (8, 128, 96, {"dsp": 0.735, "ulysses": 0.23}),
]


def base(model: str, frames: int, side: int = 64) -> Workload:
    return Workload(model=model, frames=frames, height=2 * side, width=2 * side, sp=1)


def scale_rows():
    big = cluster("128x8xh100-ib")
    rows = []
    for model in MODELS:
        for g in GPUS:
            c = big.with_gpus(g)
            for f in FRAMES:
                for s in STRATEGIES:
                    ranked = search(base(model, f), c, strategies=[s])
                    ranked = [r for r in ranked if r["strategy"] == s] or ranked
                    best = ranked[0] if ranked else None
                    if best is not None:
                        rows.append(best)
    return rows


def _cell(r) -> str:
    if r is None or not r["fits"]:
        return "does not fit"
    return (
        f"{r['samples_per_s']:.3g} (sp {r['sp']}{', 2-stage' if 'stage' in r['placement'] else ''})"
    )


def tables(rows) -> str:
    out = []
    for model in MODELS:
        for f in (256, 1024):
            out += [
                f"### {model}, {f} frames x 64x64 tokens: samples/s (chosen sp)",
                "",
                "| GPUs | " + " | ".join(STRATEGIES) + " |",
                "|---" * (len(STRATEGIES) + 1) + "|",
            ]
            for g in GPUS:
                cells = []
                for s in STRATEGIES:
                    r = next(
                        (
                            x
                            for x in rows
                            if (x["model"], x["world_size"], x["frames"], x["strategy"])
                            == (model, g, f, s)
                        ),
                        None,
                    )
                    cells.append(_cell(r))
                out.append(f"| {g} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def fit_table(model: str) -> str:
    """Longest video (of :data:`FIT_FRAMES`) that fits in 80 GiB with the best sp, and the
    samples/s there."""
    big = cluster("128x8xh100-ib")
    out = [
        f"### {model}: longest video that fits in 80 GiB (frames, of 64 x 2^k; samples/s there)",
        "",
        "| GPUs | " + " | ".join(STRATEGIES) + " |",
        "|---" * (len(STRATEGIES) + 1) + "|",
    ]
    for g in GPUS:
        cells = []
        for s in STRATEGIES:
            best = None
            for f in FIT_FRAMES:
                ranked = [r for r in search(base(model, f), big.with_gpus(g), strategies=[s])]
                ok = [r for r in ranked if r["fits"] and r["strategy"] == s]
                if not ok:
                    break
                best = ok[0]
            cells.append(
                f"{best['frames']} ({best['samples_per_s']:.2g}, sp {best['sp']})"
                if best
                else "< 64"
            )
        out.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def one_group_table(model: str, frames: int) -> str:
    """All GPUs in one sp group (dp = 1): samples/s and memory per GPU."""
    big = cluster("128x8xh100-ib")
    out = [
        f"### {model}, {frames} frames, every GPU in one sp group: samples/s / GiB per GPU",
        "",
        "| GPUs | " + " | ".join(STRATEGIES) + " |",
        "|---" * (len(STRATEGIES) + 1) + "|",
    ]
    for g in GPUS:
        cells = []
        for s in STRATEGIES:
            try:
                w = Workload(
                    model=model,
                    strategy=s,
                    frames=frames,
                    sp=g,
                    ulysses_degree=(min(g, 8) if s == "usp" else None),
                )
                r = simulate(w, big.with_gpus(g))
                mem = r["memory_per_gpu_bytes"] / 2**30
                cells.append(
                    f"{r['samples_per_s']:.3g} / {mem:.0f}" + ("" if r["fits"] else " (no fit)")
                )
            except ValueError:
                cells.append("sp > heads")
        out.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def paper_table() -> str:
    node = cluster("8xh100-nvlink")
    lines = [
        "| sp x dp | frames x tokens | strategy | step s | samples/s (node) | paper samples/s "
        "| memory GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for sp, f, side, reported in PAPER:
        for s in ("dsp", "ulysses"):
            w = Workload(strategy=s, frames=f, height=2 * side, width=2 * side, sp=sp, dp=8 // sp)
            r = simulate(w, node)
            lines.append(
                f"| {sp} x {8 // sp} | {f} x {side * side} | {s} | "
                f"{r['step_time_s']['median']:.3f} | {r['samples_per_s']:.3f} | "
                f"{reported.get(s, 'not in PAPER.md')} | {r['memory_per_gpu_bytes'] / 2**30:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/simulate")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = scale_rows()
    with open(os.path.join(args.out, "scale.json"), "w") as f:
        json.dump(
            {"meta": {"command": "python benchmarks/simulate_scale.py"}, "results": rows},
            f,
            indent=1,
            default=str,
        )
    md = "## Paper configurations\n\n" + paper_table() + "\n## At scale\n\n" + tables(rows)
    for model in MODELS:
        md += "\n" + fit_table(model) + "\n" + one_group_table(model, 1024)
    with open(os.path.join(args.out, "scale.md"), "w") as f:
        f.write(md)
    for model in MODELS:
        sel = [r for r in rows if r["model"] == model and r["frames"] in (256,)]
        plot(sel, args.out, prefix=model.replace("/", "") + "_f256_")
        sel = [r for r in rows if r["model"] == model and r["world_size"] in (64,)]
        plot(sel, args.out, prefix=model.replace("/", "") + "_g64_")
    print(md)


if __name__ == "__main__":
    main()
