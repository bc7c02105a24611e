"""Tables and plots of ``dsp simulate`` records."""

from __future__ import annotations

import os
from typing import Dict, List

__all__ = ["markdown", "plot", "longest_fitting"]


def _gib(v) -> str:
    return "-" if v is None else f"{v / 2**30:.1f}"


def markdown(rows: List[dict]) -> str:
    """One line per configuration: step time, throughput, bytes, memory, fits."""
    lines = [
        "| model | strategy | GPUs | sp x dp | T x H x W | step s | compute s | exposed comm s "
        "| samples/s | tokens/s | MiB/rank (fwd+bwd) | memory GiB | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(
                f"| {r.get('model', '')} | {r.get('strategy', '')} | "
                f"{r.get('world_size', '')} | | | error: {r['error']} | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['world_size']} | {r['sp']} x {r['dp']} | "
            f"{_size(r)} | {r['step_time_s']['median']:.3f} | "
            f"{r['compute_s']:.3f} | {r['exposed_comm_s']:.3f} | {r['samples_per_s']:.3f} | "
            f"{r['tokens_per_s']:.3g} | "
            f"{(r['bytes_sent_forward'] + r['bytes_sent_backward']) / 2**20:.0f} | "
            f"{_gib(r['memory_per_gpu_bytes'])} | {'yes' if r['fits'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def _size(r: Dict) -> str:
    if r.get("msa") is not None:
        return f"M={r['msa']} R={r['residues']}"
    return f"{r['frames']}x{r['height']}x{r['width']}"


def longest_fitting(rows: List[dict]) -> List[dict]:
    """Per (model, strategy, GPUs): the most frames whose configuration fits in memory."""
    best: dict = {}
    for r in rows:
        if r.get("error") or not r["fits"]:
            continue
        key = (r["model"], r["strategy"], r["world_size"], r["sp"])
        if key not in best or r["frames"] > best[key]["frames"]:
            best[key] = r
    return list(best.values())


def plot(rows: List[dict], out_dir: str, prefix: str = "") -> List[str]:
    """Throughput (where it fits) and memory per GPU (the limit dashed) against GPUs and
    against frames, a line per strategy (a panel per model and value of the other variable).
    Returns the PNG paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("dsp simulate: matplotlib is not installed; no plots written")
        return []
    ok = [r for r in rows if not r.get("error")]
    if not ok:
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for x, fixed in (("world_size", "frames"), ("frames", "world_size")):
        panels = sorted({(r["model"], r[fixed]) for r in ok})
        if len({r[x] for r in ok}) < 2:
            continue
        fig, axes = plt.subplots(
            2, len(panels), figsize=(4.5 * len(panels), 7), squeeze=False, sharex="col"
        )
        for j, (model, value) in enumerate(panels):
            sel = [r for r in ok if r["model"] == model and r[fixed] == value]
            for s in sorted({r["strategy"] for r in sel}):
                pts = sorted((r[x], r) for r in sel if r["strategy"] == s)
                xs = [p[0] for p in pts]
                fit = [p for p in pts if p[1]["fits"]]  # throughput only where it fits
                axes[0][j].plot(
                    [p[0] for p in fit], [p[1]["samples_per_s"] for p in fit], marker="o", label=s
                )
                axes[1][j].plot(
                    xs, [p[1]["memory_per_gpu_bytes"] / 2**30 for p in pts], marker="o", label=s
                )
            limit = sel[0]["memory_limit_bytes"] / 2**30
            axes[1][j].axhline(limit, color="grey", lw=0.8, ls="--")
            axes[0][j].set(title=f"{model}, {fixed} = {value}", ylabel="samples / s")
            axes[1][j].set(xlabel=x.replace("world_size", "GPUs"), ylabel="memory per GPU, GiB")
            for ax in (axes[0][j], axes[1][j]):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
            axes[0][j].legend(fontsize=7)
        fig.tight_layout()
        name = "vs_gpus" if x == "world_size" else "vs_frames"
        paths.append(os.path.join(out_dir, f"{prefix}{name}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
