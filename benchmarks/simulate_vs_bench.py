"""Predicted vs measured step time for committed ``dsp bench`` runs (docs/simulate.md).

    python benchmarks/simulate_vs_bench.py RUN.json [RUN.json ...] \
        --out benchmarks/results/simulate_vs_bench.md

For every run: the ``dsp simulate --from-bench`` table (:func:`dsp.sim.frombench.comparison`),
then one summary line per strategy and N: the median predicted/measured ratio over the run's
sizes, and whether every one is within 20%.
"""

from __future__ import annotations

import argparse
import json
import statistics

from dsp.sim.frombench import comparison, predict_bench


def summary(paths) -> str:
    lines = [
        "| run | strategy | N | predicted / measured (each size) | within 20% |",
        "|---|---|---|---|---|",
    ]
    for path in paths:
        with open(path) as f:
            rows, _ = predict_bench(json.load(f))
        keys = sorted({(r["strategy"], r["world_size"]) for r in rows}, key=lambda k: (k[1], k[0]))
        for s, n in keys:
            ratios = [r["ratio"] for r in rows if (r["strategy"], r["world_size"]) == (s, n)]
            ok = all(abs(x - 1) <= 0.2 for x in ratios)
            lines.append(
                f"| {path.split('/')[-1]} | {s} | {n} | "
                + ", ".join(f"{x:.2f}" for x in ratios)
                + f" (median {statistics.median(ratios):.2f}) | {'yes' if ok else 'no'} |"
            )
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
        md += "## " + path.split("/")[-1] + "\n\n" + comparison(path) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    print(md)


if __name__ == "__main__":
    main()
