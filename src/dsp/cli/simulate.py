"""``dsp simulate``: predict step time, throughput, bytes and memory on a described cluster.

    dsp simulate --model stdit-xl/2 --strategy dsp,ulysses --frames 64,128 --height 128 \\
                 --width 128 --gpus 8,16 --cluster 16x8xh100-ib --activation-checkpointing
    dsp simulate --from-bench benchmarks/results/run.json   # predicted vs measured
    dsp simulate --search --gpus 64 --frames 256 --cluster 8x8xh100-ib

Sizes are the latent video before patchify, as in ``dsp bench`` (128 x 128 latent = 64 x 64
tokens with patch 2); the Evoformer takes ``--msa`` and ``--residues``. ``--sp`` defaults to
all ``--gpus`` (dp = gpus / sp). STDiT and Latte are costed by closed forms; other models
(axial, Evoformer) and DSP's planner plan on Latte by running one rank of the engine on meta
tensors, which raises the engine's own error where a strategy cannot run the model. See
docs/simulate.md for the model, its defaults and their sources.
"""

from __future__ import annotations

import argparse
import json
import os

from dsp.cli.lists import ints, names


def add_parser(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="cost model: step time, throughput, memory on a cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=names, default=["stdit-xl/2"])
    p.add_argument("--strategy", type=names, default=["dsp", "ulysses", "ring", "megatron_sp"])
    p.add_argument("--frames", type=ints, default=[64])
    p.add_argument("--height", type=ints, default=[128], help="latent height (list sweeps)")
    p.add_argument("--width", type=ints, default=[128], help="latent width (list sweeps)")
    p.add_argument("--msa", type=int, default=64, help="Evoformer: MSA sequences M")
    p.add_argument("--residues", type=int, default=64, help="Evoformer: residues R")
    p.add_argument("--batch", type=int, default=1, help="samples per sp group")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--gpus", type=ints, default=[8])
    p.add_argument("--sp", type=ints, default=None, help="sp degree(s); default: all GPUs")
    p.add_argument("--cluster", default="16x8xh100-ib", help="preset or JSON file")
    p.add_argument("--mfu", type=float, default=None, help="override the GPU's achieved fraction")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--dp-style", choices=["ddp", "zero1", "zero2", "fsdp"], default="zero2")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--text-len", type=int, default=120)
    p.add_argument("--ulysses-degree", type=int, default=None, help="usp: Ulysses degree")
    p.add_argument(
        "--plan",
        choices=["auto", "hand"],
        default="auto",
        help="dsp's plan: auto (the planner's, as dsp bench runs it) or hand (the paper's)",
    )
    p.add_argument("--memory-limit", type=float, default=None, help="GiB per GPU (default: GPU)")
    p.add_argument("--search", action="store_true", help="best sp / mesh / placement per size")
    p.add_argument(
        "--objective",
        choices=["time", "bytes"],
        default="time",
        help="--search: rank by predicted time per sample, or by bytes per rank (for comparison)",
    )
    p.add_argument("--from-bench", default=None, help="predict a dsp bench JSON")
    p.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="--from-bench: compare median step times or the fastest repeats",
    )
    p.add_argument("--json", default=None, help="write {meta, results} JSON here")
    p.add_argument("--out", default=None, help="directory for plots (default: beside --json)")
    p.set_defaults(func=run)


def _base(args):
    from dsp.sim.workload import Workload

    e = 2 if args.dtype == "bf16" else 4
    return Workload(
        batch=args.batch,
        mode=args.mode,
        text_len=args.text_len,
        elem=e,
        param_elem=e,
        activation_checkpointing=args.activation_checkpointing,
        dp_style=args.dp_style,
        ulysses_degree=args.ulysses_degree,
        msa=args.msa,
        residues=args.residues,
        plan=args.plan,
    )


def _rows(args, c):
    import dataclasses

    from dsp.sim.search import search
    from dsp.sim.step import simulate

    base = _base(args)
    limit = args.memory_limit * 2**30 if args.memory_limit else None
    rows = []
    for model in args.model:
        for g in args.gpus:
            cg = c.with_gpus(g)
            for f in args.frames:
                for h in args.height:
                    for wd in args.width:
                        w0 = dataclasses.replace(base, model=model, frames=f, height=h, width=wd)
                        if args.search:
                            best = search(
                                w0,
                                cg,
                                strategies=args.strategy,
                                memory_limit=limit,
                                objective=args.objective,
                            )
                            rows += best[:1]
                            continue
                        for s in args.strategy:
                            for sp in args.sp or [g]:
                                try:
                                    w = dataclasses.replace(
                                        w0, strategy=s if sp > 1 else "none", sp=sp, dp=g // sp
                                    )
                                    if g % sp:
                                        raise ValueError(f"sp {sp} does not divide {g} GPUs")
                                    rows.append(simulate(w, cg, memory_limit=limit))
                                except ValueError as e:
                                    rows.append(
                                        {
                                            "model": model,
                                            "strategy": s,
                                            "world_size": g,
                                            "frames": f,
                                            "error": str(e),
                                        }
                                    )
    return rows


def run(args) -> int:
    from dsp.sim.hardware import cluster
    from dsp.sim.report import longest_fitting, markdown, plot

    if args.from_bench:
        from dsp.sim.frombench import comparison

        print(comparison(args.from_bench, stat=args.stat))
        return 0
    c = cluster(args.cluster, mfu=args.mfu)
    rows = _rows(args, c)
    print(f"cluster: {c.describe()}")
    print(f"GPU: {c.gpu.source}; links: {c.intra.source}; {c.inter.source}\n")
    print(markdown(rows))
    if args.search:
        for r in rows:
            print(
                f"best for {r['model']} T={r['frames']} on {r['world_size']} GPUs: "
                f"{r['strategy']} sp={r['sp']} dp={r['dp']} {r['placement']}: "
                f"{r['samples_per_s']:.3g} samples/s, "
                f"{(r['bytes_sent_forward'] + r['bytes_sent_backward']) / 2**20:.0f} MiB/rank"
            )
    fit = longest_fitting(rows)
    if fit and len(args.frames) > 1:
        print("\nlongest video that fits (frames):")
        for r in fit:
            print(f"  {r['model']} {r['strategy']} {r['world_size']} GPUs: {r['frames']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = {
            "cluster": c.describe(),
            "gpu_source": c.gpu.source,
            "links": [c.intra.source, c.inter.source],
            "config": vars(args) | {"func": None},
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2, default=str)
        out = args.out or os.path.dirname(os.path.abspath(args.json))
        stem = os.path.splitext(os.path.basename(args.json))[0]
        for p in plot(rows, out, prefix=stem + "_"):
            print(f"wrote {p}")
    return 0 if all(not r.get("error") for r in rows) else 1
