"""Benchmark reports: JSON (schema in docs/benchmarks.md), a markdown table and PNG plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import sys
from typing import List, Optional

import torch

import dsp

__all__ = [
    "comm_split",
    "label",
    "environment",
    "markdown",
    "plot",
    "speedups",
    "vs_serial_estimate",
    "write_json",
]


def environment() -> dict:
    """Hardware and versions for the report's meta block."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "dsp": dsp.__version__,
        "backend": "gloo",
        "threads_per_rank": 1,
    }


def uptime() -> str:
    """The machine's load as ``uptime`` prints it (the load averages where it is missing):
    what a report records before and after its runs."""
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())


def label(r: dict) -> str:
    """A result's strategy as reports name it: options that change how it communicates
    are part of the name (``ulysses (qkv in one)``, ``dsp (2 chunks)``, ``dsp (auto: 4
    chunks)`` with the counts the planner chose)."""
    options = r.get("options") or {}
    one = options.get("qkv_one_all_to_all")
    chunks = options.get("chunks") or 1
    if chunks == "auto":
        got = [k for k in r.get("chunks_chosen") or [] if k > 1]
        chunks_text = f" (auto: {'/'.join(map(str, got))} chunks)" if got else " (auto: blocking)"
    else:
        chunks_text = f" ({chunks} chunks)" if chunks > 1 else ""
    return r["strategy"] + (" (qkv in one)" if one else "") + chunks_text


def write_json(path: str, meta: dict, results: List[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2, default=str)


def _kib(v: Optional[float]) -> str:
    return "-" if v is None else f"{v / 1024:.1f}"


def speedups(results: List[dict], base: str = "dsp") -> List[dict]:
    """DSP's throughput over each baseline at the same size and world size."""
    key = ("model", "world_size", "frames", "height", "width", "batch", "mode", "depth")
    out = []
    for r in results:
        if r["strategy"] != base or not r["samples_per_s"]:
            continue
        for o in results:
            if o["strategy"] != base and all(o[k] == r[k] for k in key) and o["samples_per_s"]:
                out.append(
                    {
                        **{k: r[k] for k in key},
                        "dsp": label(r),
                        "baseline": label(o),
                        "speedup": r["samples_per_s"] / o["samples_per_s"],
                        "bytes_ratio": (r["bytes_sent_forward"] + r["bytes_sent_backward"])
                        / max(1, o["bytes_sent_forward"] + o["bytes_sent_backward"]),
                    }
                )
    return out


def comm_split(meta: dict, results: List[dict]) -> List[dict]:
    """Each measured configuration's step split into compute, exposed and hidden communication.

    ``exposed``: the median seconds the slowest rank spent blocked in communication calls
    (``exposed_comm_s``); ``compute = step - exposed``. ``comm_at_link``: the step's bytes
    (forward, backward, gradient sync) at the achieved all-to-all rate measured for that
    world size (``None`` where none was measured); ``hidden = max(0, comm_at_link -
    exposed)``: transfer time that ran under compute (ring attention's overlapped blocks), an
    estimate, since the link rate is measured for one large all-to-all.
    """
    links = meta.get("link", {}).get("per_world_size", {})
    out = []
    for r in results:
        st, ex = r.get("step_time_s"), r.get("exposed_comm_s")
        if not st or not ex:
            continue
        link = links.get(r["world_size"]) or links.get(str(r["world_size"])) or {}
        bw = link.get("achieved_bytes_per_s")
        nbytes = sum(r.get(k) or 0 for k in _BYTES)
        at_link = nbytes / bw if bw and r["world_size"] > 1 else (0.0 if nbytes == 0 else None)
        step, exposed = st["median"], min(ex["median"], st["median"])
        out.append(
            {
                "strategy": label(r),
                "world_size": r["world_size"],
                "frames": r["frames"],
                "height": r["height"],
                "width": r["width"],
                "step_s": step,
                "compute_s": step - exposed,
                "exposed_s": exposed,
                "comm_at_link_s": at_link,
                "hidden_s": None if at_link is None else max(0.0, at_link - exposed),
                "cpu_busy": (r.get("cpu_busy") or {}).get("utilization"),
            }
        )
    return out


_BYTES = ("bytes_sent_forward", "bytes_sent_backward", "bytes_sent_grad_sync")


def _comm_lines(meta: dict, results: List[dict]) -> List[str]:
    rows = comm_split(meta, results)
    if not rows:
        return []
    out = [
        "",
        "## Compute and communication per step",
        "",
        "exposed: median seconds the slowest rank spent blocked in communication calls; "
        "compute = step - exposed; at link: the step's bytes at the achieved all-to-all rate; "
        "hidden = at link - exposed (>= 0), transfer time that ran under compute; cores busy: "
        "the ranks' CPU seconds per step (gloo's threads included) over cores x step",
        "",
        "| strategy | N | T x H x W | step s | compute s | exposed s | exposed % | at link s | "
        "hidden s | cores busy % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        link = "-" if c["comm_at_link_s"] is None else f"{c['comm_at_link_s']:.3f}"
        hidden = "-" if c["hidden_s"] is None else f"{c['hidden_s']:.3f}"
        busy = "-" if c.get("cpu_busy") is None else f"{100 * c['cpu_busy']:.0f}"
        out.append(
            f"| {c['strategy']} | {c['world_size']} | {c['frames']}x{c['height']}x{c['width']} | "
            f"{c['step_s']:.3f} | {c['compute_s']:.3f} | {c['exposed_s']:.3f} | "
            f"{100 * c['exposed_s'] / c['step_s']:.0f} | {link} | {hidden} | {busy} |"
        )
    return out


def vs_serial_estimate(meta: dict, results: List[dict]) -> List[dict]:
    """DSP's step time against the serial estimate ``single-process time / N + DSP's bytes /
    achieved bandwidth`` (compute split N ways, then communication with no overlap).

    Needs the single-process reference (``--single``) and an emulated link whose per-rank
    all-to-all bandwidth was measured. A ratio well above 1 means overhead beyond both.
    """
    links = meta.get("link", {}).get("per_world_size", {})
    out = []
    for r in results:
        link = links.get(r["world_size"]) or links.get(str(r["world_size"])) or {}
        bw = link.get("achieved_bytes_per_s")
        if r["strategy"] != "dsp" or not r["step_time_s"] or not link.get("emulated") or not bw:
            continue
        single = next(
            (
                o
                for o in results
                if o["strategy"] == "none"
                and o["world_size"] == 1
                and o["step_time_s"]
                and all(
                    o[k] == r[k]
                    for k in ("model", "frames", "height", "width", "batch", "mode", "depth")
                )
            ),
            None,
        )
        if single is None:
            continue
        comm = (
            r["bytes_sent_forward"] + r["bytes_sent_backward"] + (r["bytes_sent_grad_sync"] or 0)
        ) / bw
        estimate = single["step_time_s"]["median"] / r["world_size"] + comm
        out.append(
            {
                "world_size": r["world_size"],
                "frames": r["frames"],
                "height": r["height"],
                "width": r["width"],
                "single_s": single["step_time_s"]["median"],
                "comm_s": comm,
                "estimate_s": estimate,
                "dsp_s": r["step_time_s"]["median"],
                "ratio": r["step_time_s"]["median"] / estimate,
            }
        )
    return out


def markdown(meta: dict, results: List[dict], title: str = "dsp bench") -> str:
    link = meta.get("link", {})
    lines = [
        f"# {title}",
        "",
        f"- date {meta['date']}, host `{meta['host']}`, {meta['cpu']} ({meta['cpu_count']} "
        f"cores), {meta['platform']}",
        f"- python {meta['python']}, torch {meta['torch']}, dsp {meta['dsp']}, "
        f"{meta['backend']}, {meta['threads_per_rank']} thread per rank",
        f"- link: {link.get('description', 'plain loopback')}",
    ]
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    lines += [
        "- step time: median (min-max) over the repeats of the slowest rank's step; bytes: "
        "per rank per step (the largest rank), forward / backward / gradient sync",
        "",
        "| model | strategy | N | T x H x W | batch | mode | step s | samples/s | tokens/s | "
        "fwd KiB | bwd KiB | sync KiB | saved KiB | peak RSS MiB | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        st = r["step_time_s"]
        step = f"{st['median']:.3f} ({st['min']:.3f}-{st['max']:.3f})" if st else "-"
        lines.append(
            f"| {r['model']} | {label(r)} | {r['world_size']} | "
            f"{r['frames']}x{r['height']}x{r['width']} | {r['batch']} | {r['mode']} | {step} | "
            f"{r['samples_per_s'] or 0:.3f} | {r['tokens_per_s'] or 0:.0f} | "
            f"{_kib(r['bytes_sent_forward'])} | {_kib(r['bytes_sent_backward'])} | "
            f"{_kib(r['bytes_sent_grad_sync'])} | {_kib(r['saved_activation_bytes'])} | "
            f"{(r['peak_rss_bytes'] or 0) / 2**20:.0f} | {r['error'] or ''} |"
        )
    lines += _match_lines(meta) + _comm_lines(meta, results) + _vs_single_lines(results)
    sp = speedups(results)
    if sp:
        lines += [
            "",
            "## DSP over each baseline",
            "",
            "| model | N | T x H x W | dsp | baseline | throughput speedup | "
            "DSP bytes / baseline bytes |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in sp:
            lines.append(
                f"| {s['model']} | {s['world_size']} | {s['frames']}x{s['height']}x{s['width']} "
                f"| {s['dsp']} | {s['baseline']} | {s['speedup']:.2f}x | {s['bytes_ratio']:.3f} |"
            )
    ob = vs_serial_estimate(meta, results)
    if ob:
        lines += [
            "",
            "## DSP's step time against a serial estimate",
            "",
            "estimate = single-process step / N + DSP's bytes / achieved link bandwidth "
            "(no overlap)",
            "",
            "| N | T x H x W | single s | bytes at link s | estimate s | DSP s | DSP / estimate |",
            "|---|---|---|---|---|---|---|",
        ]
        for b in ob:
            lines.append(
                f"| {b['world_size']} | {b['frames']}x{b['height']}x{b['width']} | "
                f"{b['single_s']:.3f} | {b['comm_s']:.3f} | {b['estimate_s']:.3f} | "
                f"{b['dsp_s']:.3f} | {b['ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _match_lines(meta: dict) -> List[str]:
    """The workload match of each emulated world size (dsp.bench.target)."""
    per = meta.get("link", {}).get("per_world_size", {})
    rows = [(int(n), m) for n, m in per.items() if m.get("target_ratio")]
    if not rows:
        return []
    out = [
        "",
        "## The workload the link stands for",
        "",
        "DSP's communication / compute time: the target's as `dsp simulate` predicts it, and "
        "this run's at calibration (DSP's bytes at the achieved rate over its measured compute)",
        "",
        "| N | target | target ratio | bench ratio | achieved | peak-FLOP/s calibration "
        "would set |",
        "|---|---|---|---|---|---|",
    ]
    for n, m in sorted(rows):
        out.append(
            f"| {n} | {m.get('target_workload', m.get('target'))} | {m['target_ratio']:.3f} | "
            f"{m.get('bench_ratio', 0):.3f} | "
            f"{m['achieved_bytes_per_s'] / 1e6:.1f} MB/s | {m['peak_rate'] / 1e6:.2f} MB/s |"
        )
    return out


def _vs_single_lines(results: List[dict]) -> List[str]:
    """Each configuration's throughput over one process's at the same size (``--single``)."""
    key = ("model", "frames", "height", "width", "batch", "mode", "depth", "hidden", "heads")
    single = {
        tuple(r.get(k) for k in key): r["samples_per_s"]
        for r in results
        if r["strategy"] == "none" and r["world_size"] == 1 and r["samples_per_s"]
    }
    rows = [
        (r, r["samples_per_s"] / single[tuple(r.get(k) for k in key)])
        for r in results
        if r["world_size"] > 1 and r["samples_per_s"] and tuple(r.get(k) for k in key) in single
    ]
    if not rows:
        return []
    out = ["", "## Throughput over one process", "", "| N | T x H x W | strategy | x one process |"]
    out.append("|---|---|---|---|")
    for r, x in rows:
        out.append(
            f"| {r['world_size']} | {r['frames']}x{r['height']}x{r['width']} | {label(r)} | "
            f"{x:.2f}x |"
        )
    return out


def plot(
    results: List[dict], out_dir: str, prefix: str = "", meta: Optional[dict] = None
) -> List[str]:
    """Throughput vs sequence length, bytes per step, DSP speedups, and each configuration's
    step as compute / hidden / exposed communication (``comm.png``). Returns PNG paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "dsp bench: matplotlib is not installed (pip install 'dsp-torch[bench]'); "
            "no plots written"
        )
        return []
    os.makedirs(out_dir, exist_ok=True)
    ok = [r for r in results if r["samples_per_s"]]
    strategies = sorted({label(r) for r in ok})
    sizes = sorted({r["world_size"] for r in ok})
    paths = []

    fig, axes = plt.subplots(
        1, max(1, len(sizes)), figsize=(5 * max(1, len(sizes)), 4), squeeze=False
    )
    for ax, n in zip(axes[0], sizes):
        for s in strategies:
            pts = sorted(
                (r["frames"] * r["patches"], r["tokens_per_s"])
                for r in ok
                if label(r) == s and r["world_size"] == n
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s)
        ax.set(
            title=f"N = {n}",
            xlabel="sequence length (T x S tokens)",
            ylabel="tokens / s",
            xscale="log",
        )
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, prefix + "throughput.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{label(r)}\nN={r['world_size']}\nT={r['frames']}" for r in ok]
    fwd = [r["bytes_sent_forward"] / 2**20 for r in ok]
    bwd = [r["bytes_sent_backward"] / 2**20 for r in ok]
    ax.bar(range(len(ok)), fwd, label="forward")
    ax.bar(range(len(ok)), bwd, bottom=fwd, label="backward")
    ax.set_xticks(range(len(ok)), labels, fontsize=6)
    ax.set(ylabel="MiB sent per rank per step", title="communication per step")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, prefix + "bytes.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    split = comm_split(meta or {}, results)
    if split:
        paths.append(_plot_comm(plt, split, os.path.join(out_dir, prefix + "comm.png")))

    sp = speedups(results)
    if sp:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(range(len(sp)), [s["speedup"] for s in sp])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(
            range(len(sp)),
            [f"vs {s['baseline']}\nN={s['world_size']} T={s['frames']}" for s in sp],
            fontsize=6,
        )
        ax.set(ylabel="DSP throughput / baseline", title="speedup of DSP")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, prefix + "speedup.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _plot_comm(plt, split: List[dict], path: str) -> str:
    """Stacked bars per configuration: compute alone, compute with communication hidden
    under it, exposed communication; the bar's height is the step time."""
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(split) + 2), 4))
    x = range(len(split))
    hidden = [min(c["hidden_s"] or 0.0, c["compute_s"]) for c in split]
    alone = [c["compute_s"] - h for c, h in zip(split, hidden)]
    exposed = [c["exposed_s"] for c in split]
    ax.bar(x, alone, label="compute", color="tab:blue")
    ax.bar(x, hidden, bottom=alone, label="compute + hidden comm", color="tab:cyan", hatch="//")
    ax.bar(
        x,
        exposed,
        bottom=[a + h for a, h in zip(alone, hidden)],
        label="exposed comm",
        color="tab:red",
    )
    ax.set_xticks(
        list(x),
        [f"{c['strategy']}\nN={c['world_size']}\nT={c['frames']}" for c in split],
        fontsize=6,
    )
    ax.set(ylabel="seconds per step (slowest rank)", title="compute and communication per step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
