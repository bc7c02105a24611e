"""``dsp bench``: sweep strategies, sizes and world sizes; write JSON, markdown and plots.

Each configuration runs one training step (forward + backward + gradient sync + AdamW) or one
forward (``--mode infer``) per repeat on CPU ranks, optionally on an emulated interconnect
(``--link``: each rank in its own network namespace behind a rate-limited veth, the rate
calibrated so that this CPU's compute-to-bandwidth ratio matches the target's). See
docs/benchmarks.md for the JSON schema and the calibration.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from dsp.cli.errors import add_job_flags, apply_timeout
from dsp.cli.lists import chunk_counts, ints, names
from dsp.cli.table import human_bytes


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark strategies (JSON, markdown, plots)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        type=names,
        default=["stdit-tiny"],
        help="model config name(s), comma-separated (see dsp.models.list_models), or "
        "diffusers:latte, diffusers:wan, diffusers:animatediff, diffusers:svd (diffusers' own "
        "models, tiny "
        "random configs, unchanged; megatron_sp does not apply to them)",
    )
    p.add_argument(
        "--strategy",
        type=names,
        default=["dsp", "ulysses", "ring", "megatron_sp"],
        help="comma-separated: dsp,ulysses,ring,megatron_sp,usp,none",
    )
    p.add_argument(
        "--plan",
        default="auto",
        help="dsp's plan: auto (the planner, per size), hand (the paper's placement) or a "
        "plan JSON file",
    )
    p.add_argument("--world-size", type=ints, default=[2, 4], help="e.g. 2,4")
    p.add_argument("--frames", type=ints, default=[16], help="latent frames T (list sweeps)")
    p.add_argument("--height", type=ints, default=[32], help="latent height (list sweeps)")
    p.add_argument("--width", type=ints, default=[32], help="latent width (list sweeps)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--depth", type=int, default=None, help="override the number of layers")
    p.add_argument("--hidden", type=int, default=None, help="override the hidden size")
    p.add_argument("--heads", type=int, default=None, help="override the number of heads")
    p.add_argument("--ulysses-degree", type=int, default=None, help="usp: Ulysses degree")
    p.add_argument(
        "--ulysses-qkv",
        choices=["three", "one", "both"],
        default="three",
        help="ulysses/usp: q, k, v in three all-to-alls (DeepSpeed's, the default), in one "
        "(same bytes), or both (one row each)",
    )
    p.add_argument(
        "--chunks",
        type=chunk_counts,
        default=[1],
        help="dsp: run each compute stage in k overlapped slices (switches overlap compute, "
        "forward and backward); a list adds one dsp row per k, e.g. 1,2,4 (1: blocking); "
        "auto: the planner chooses k per stage from the predicted time on this link (its "
        "measured rate and FLOP/s; no overlap gain where ranks outnumber cores)",
    )
    p.add_argument(
        "--no-grad-sync",
        action="store_true",
        help="train: skip the gradient all-reduce after backward (the same for every "
        "sequence-parallel strategy; isolates their own communication)",
    )
    p.add_argument(
        "--single",
        action="store_true",
        help="also run the single-process reference (strategy none, N = 1)",
    )
    p.add_argument(
        "--link",
        default="none",
        help="none | nvlink | ib | RATE (e.g. 25MB/s, 200mbit): emulated interconnect; ib and "
        "nvlink give DSP the communication:compute time ratio dsp simulate predicts for the "
        "--target-* workload on that link (same N)",
    )
    p.add_argument("--target-model", default="stdit-xl/2", help="workload the link stands for")
    p.add_argument("--target-frames", type=int, default=64, help="its frames (after patchify)")
    p.add_argument("--target-tokens", default="64x64", help="its spatial tokens per frame, HxW")
    p.add_argument("--target-gpu", default="h100", help="its GPU type (dsp.sim.hardware.GPUS)")
    p.add_argument("--target-mfu", type=float, default=None, help="its achieved fraction of peak")
    p.add_argument(
        "--target-activation-checkpointing",
        action="store_true",
        help="the target recomputes activations (adds compute and DSP's forward switches)",
    )
    add_job_flags(p, timeout=600, what="sweep")
    p.add_argument("--json", default=None, help="write {meta, results} JSON here")
    p.add_argument(
        "--out",
        default=None,
        help="directory for the markdown report and PNGs (default: beside --json, "
        "else ./bench-report)",
    )
    p.set_defaults(func=run)


def configs_from_args(args):
    from dsp.bench.runner import BenchConfig, expand

    base = BenchConfig(
        batch=args.batch,
        mode=args.mode,
        warmup=args.warmup,
        repeats=args.repeats,
        depth=args.depth,
        hidden=args.hidden,
        heads=args.heads,
        grad_sync=not args.no_grad_sync,
        plan=args.plan,
    )
    configs = expand(
        base,
        model=args.model,
        strategy=args.strategy,
        world_size=args.world_size,
        frames=args.frames,
        height=args.height,
        width=args.width,
    )
    if args.ulysses_degree:
        configs = [
            expand(c, options=[{"ulysses_degree": args.ulysses_degree}])[0]
            if c.strategy == "usp"
            else c
            for c in configs
        ]
    if args.ulysses_qkv != "three":
        one = [{"qkv_one_all_to_all": True}]
        configs = [
            d
            for c in configs
            for d in (
                ([c] if args.ulysses_qkv == "both" else [])
                + [expand(c, options=[{**c.options, **one[0]}])[0]]
                if c.strategy in ("ulysses", "usp")
                else [c]
            )
        ]
    if args.chunks != [1]:
        configs = [
            expand(c, options=[{**c.options, "chunks": k}])[0] if k != 1 else c
            for c in configs
            for k in (args.chunks if c.strategy == "dsp" else [1])
        ]
    if args.single:
        configs += expand(
            base,
            model=args.model,
            strategy=["none"],
            world_size=[1],
            frames=args.frames,
            height=args.height,
            width=args.width,
        )
    return configs


def target_from_args(args):
    """The :class:`~dsp.bench.target.TargetWorkload` of the ``--target-*`` flags."""
    from dsp.bench.target import TargetWorkload

    h, _, w = args.target_tokens.lower().partition("x")
    return TargetWorkload(
        model=args.target_model,
        frames=args.target_frames,
        tokens_h=int(h),
        tokens_w=int(w or h),
        gpu=args.target_gpu,
        mfu=args.target_mfu,
        activation_checkpointing=args.target_activation_checkpointing,
    )


def check_flags(args) -> None:
    """Flags that would fail only after ranks started: one line each, before anything runs."""
    from dsp.bench.calibrate import TARGETS, parse_rate
    from dsp.watchdog import check_local_world

    apply_timeout(args)
    if args.link != "none" and args.link not in TARGETS:
        try:
            parse_rate(args.link)
        except ValueError as e:
            raise ValueError(
                f"--link {args.link!r}: expected none, {', '.join(TARGETS)} or a rate such as "
                f"25MB/s or 200mbit ({e})"
            ) from None
    for flag in ("world_size", "frames", "height", "width"):
        for v in getattr(args, flag):
            if v < 1:
                raise ValueError(f"--{flag.replace('_', '-')} values must be >= 1, got {v}")
    if not args.world_size:
        raise ValueError("--world-size needs at least one value, e.g. 2,4")
    check_local_world(max(args.world_size), force=args.force)
    check_diffusers(args)
    check_shards(args)


def check_diffusers(args) -> None:
    """``diffusers:NAME`` models: a known name and diffusers installed, before ranks start."""
    import importlib.util

    from dsp.bench.diffusers import is_diffusers, model_config, tiny_name

    for name in filter(is_diffusers, args.model):
        model_config(tiny_name(name), args.depth, args.hidden, args.heads)
        if importlib.util.find_spec("diffusers") is None:
            raise ValueError(f"--model {name} needs diffusers: pip install -e '.[diffusers]'")


def check_shards(args) -> None:
    """Every rank gets at least one patched frame and one patch: refused up front, instead of
    a hang until the timeout (the strategies are not run with empty shards)."""
    import torch

    from dsp.models import build_model

    n = max(args.world_size)
    if n < 2:
        return
    for name in args.model:
        try:
            with torch.device("meta"):
                pt, ph, pw = build_model(name).config.patch_size
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # not a video model with patches (or unknown: the sweep reports it)
        for t in args.frames:
            if t // pt < n:
                raise ValueError(
                    f"--frames {t} gives {t // pt} patched frame(s) for {name}, fewer than "
                    f"--world-size {n}: every rank needs at least one; use --frames >= {n * pt}"
                )
        for h in args.height:
            for w in args.width:
                if (h // ph) * (w // pw) < n:
                    raise ValueError(
                        f"--height {h} x --width {w} gives {(h // ph) * (w // pw)} patch(es) "
                        f"per frame for {name}, fewer than --world-size {n}"
                    )


def progress(total: int):
    """A rich progress bar when rich is installed, else one line per result."""
    try:
        from rich.progress import Progress
    except ImportError:
        done = [0]

        def tick(row):
            done[0] += 1
            print(
                f"[{done[0]}/{total}] {row['strategy']} N={row['world_size']} "
                f"T={row['frames']}: {row['error'] or 'ok'}",
                flush=True,
            )

        return None, tick
    bar = Progress()
    task = bar.add_task("dsp bench", total=total)

    def tick(row):
        st = row["step_time_s"]
        bar.console.print(
            f"{row['model']} {row['strategy']:>11} N={row['world_size']} "
            f"T={row['frames']} {row['height']}x{row['width']}: "
            + (
                f"{st['median']:.3f} s/step, {human_bytes(row['bytes_sent_forward'])} fwd"
                if st
                else f"error: {row['error']}"
            ),
            markup=False,  # errors quote "[file.cc:129]", which rich would read as a tag
        )
        bar.advance(task)

    return bar, tick


def run(args) -> int:
    from dsp.bench.report import environment, markdown, plot, write_json
    from dsp.bench.sweep import run_sweep

    check_flags(args)
    configs = configs_from_args(args)
    bar, tick = progress(len(configs))
    with bar if bar is not None else _null():
        rows, links = run_sweep(configs, args.link, tick, target=target_from_args(args))
    meta = environment()
    meta.update(
        command="dsp bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "bench"
        else "dsp bench",
        link={
            "setting": args.link,
            "per_world_size": links,
            "description": "; ".join(f"N={n}: {m.get('description')}" for n, m in links.items()),
        },
        config=vars(args) | {"func": None},
    )
    out_dir = args.out or (
        os.path.dirname(os.path.abspath(args.json)) if args.json else "bench-report"
    )
    os.makedirs(out_dir, exist_ok=True)
    if args.json:
        write_json(args.json, meta, rows)
    md = markdown(meta, rows)
    stem = os.path.splitext(os.path.basename(args.json))[0] if args.json else "bench"
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(md)
    pngs = plot(rows, out_dir, prefix=stem + "_" if args.json else "", meta=meta)
    print(md)
    print(
        f"wrote {os.path.join(out_dir, stem + '.md')}"
        + (f", {args.json}" if args.json else "")
        + "".join(f", {p}" for p in pngs)
    )
    return 0 if all(not r["error"] for r in rows) else 1


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
