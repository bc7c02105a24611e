"""Predicted vs measured step time for committed ``dsp bench`` runs (docs/simulate.md).

    python benchmarks/simulate_vs_bench.py RUN.json [RUN.json ...] \
        --out benchmarks/results/simulate_vs_bench.md

For every run: the ``dsp simulate --from-bench`` table (:func:`dsp.sim.frombench.comparison`),
then one summary line per strategy and N: predicted/measured for each size, from median step
times and from the fastest repeats, and whether every one is within 20%.
"""

from __future__ import annotations

import argparse
import json

from dsp.sim.frombench import comparison, predict_bench


def summary(paths) -> str:
    lines = [
        "| run | strategy | N | predicted / measured, medians | within 20% | "
        "predicted / measured, fastest repeats | within 20% |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        by = {stat: predict_bench(data, stat)[0] for stat in ("median", "min")}
        rows = by["median"]
        keys = sorted({(r["strategy"], r["world_size"]) for r in rows}, key=lambda k: (k[1], k[0]))
        for s, n in keys:
            cells = []
            for stat in ("median", "min"):
                ratios = [
                    r["ratio"] for r in by[stat] if (r["strategy"], r["world_size"]) == (s, n)
                ]
                ok = all(abs(x - 1) <= 0.2 for x in ratios)
                cells.append(", ".join(f"{x:.2f}" for x in ratios) + f" | {'yes' if ok else 'no'}")
            lines.append(f"| {path.split('/')[-1]} | {s} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=None)
    ap.add_argument("--preamble", default="", help="markdown put before the tables")
    args = ap.parse_args()
    md = "# dsp simulate against dsp bench on this machine\n\n"
    md += (args.preamble + "\n\n") if args.preamble else ""
    md += "## Summary\n\n" + summary(args.runs) + "\n"
    for path in args.runs:
        for stat in ("median", "min"):
            md += f"## {path.split('/')[-1]}: {stat} step times\n\n"
            md += comparison(path, stat=stat) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    print(md)


if __name__ == "__main__":
    main()
