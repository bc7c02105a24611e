"""``dsp plan``: the planner's plan for a registered model, with the bytes of every switch.

The model is built on the ``meta`` device and recorded once on meta inputs of the given
sizes (no memory, no compute, no process group). Bytes are summed over all ranks, forward
plus backward, for one training step in float32. ``--dry-run`` checks a plan (the planner's,
or one loaded with ``--plan``) against the model and the world size and says what is wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Tuple

import torch

from dsp.cli.lists import chunk_count
from dsp.cli.table import human_bytes
from dsp.models.plans import hand_plan
from dsp.parallelize import Plan, PlanError, check_plan, record
from dsp.parallelize.plan import text_table


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="plan where to shard and switch, with exact bytes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="stdit-tiny", help="a registered model (dsp.models)")
    p.add_argument("--world-size", type=int, default=4, help="sequence-parallel degree N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=16, help="video models: frames")
    p.add_argument("--height", type=int, default=32, help="video models: height (pixels)")
    p.add_argument("--width", type=int, default=32, help="video models: width (pixels)")
    p.add_argument("--text-len", type=int, default=120, help="STDiT/Latte: text tokens")
    p.add_argument("--msa", type=int, default=64, help="Evoformer: MSA sequences M")
    p.add_argument("--residues", type=int, default=64, help="Evoformer: residues R")
    p.add_argument("--even-only", action="store_true", help="shard only dims N divides")
    p.add_argument("--plan", type=Path, help="check/cost this plan (JSON) instead of planning")
    p.add_argument("--dry-run", action="store_true", help="validate the plan, print OK or why not")
    p.add_argument("--json", type=Path, help="write the plan as JSON to this path")
    p.add_argument(
        "--cluster",
        help="plan for time on this cluster (dsp simulate's presets, e.g. 8xh100-nvlink, "
        "2x8xh100-ib, or a JSON file) instead of bytes; prints both plans' predicted time",
    )
    p.add_argument(
        "--chunks",
        type=chunk_count,
        default=None,
        help="run the compute stages that can in k overlapped slices; auto (needs --cluster): "
        "the count each stage's predicted time on the cluster is least with, printed per stage",
    )
    p.set_defaults(func=run)


def example_inputs(name: str, model: torch.nn.Module, args: Any) -> Tuple[torch.Tensor, ...]:
    """Meta-device inputs of a registered model for the sizes in ``args``."""
    c, b = model.config, args.batch
    if name.startswith("evoformer"):
        msa = torch.empty(b, args.msa, args.residues, c.c_m, device="meta")
        pair = torch.empty(b, args.residues, args.residues, c.c_z, device="meta")
        return (msa.requires_grad_(), pair.requires_grad_())  # a trunk fed by embedders
    video = torch.empty(b, c.in_channels, args.frames, args.height, args.width, device="meta")
    if name.startswith("axial"):
        return (video,)
    timestep = torch.zeros(b, device="meta")
    text = torch.empty(b, args.text_len, c.caption_channels, device="meta")
    return (video, timestep, text)


def _price(spec: str, n: int):
    """The planner's price: predicted seconds per collective on the cluster ``spec``."""
    from dsp.sim.hardware import cluster
    from dsp.sim.plan_price import link_price

    return link_price(cluster(spec), n, itemsize_scale=0.5)  # recorded fp32, the target bf16


def _timing(spec: str, n: int):
    from dsp.sim.hardware import cluster
    from dsp.sim.plan_price import timing

    return timing(cluster(spec), n, itemsize_scale=0.5)


def _unsliced(plan: Plan) -> Plan:
    """``plan`` with every stage blocking."""
    stages = tuple(dataclasses.replace(st, chunks=None) for st in plan.stages)
    return Plan(plan.streams, stages, plan.params)


def _slices(rec, plan: Plan, n: int, timing) -> None:
    """Per overlappable stage: the predicted step time of each slice count tried."""
    from dsp.parallelize import choose_chunks

    _, report = choose_chunks(_unsliced(plan), rec.trace, rec.decl, n, timing)
    chosen = {st.module: st.chunks or 1 for st in plan.stages}
    rows = [
        [module, str(chosen.get(module, 1))]
        + [f"{k}: {t * 1e3:.3f}" for k, t in sorted(times.items())]
        for module, times in report.items()
    ]
    if not rows:
        print("no stage can run in overlapped slices here (every stage stays blocking)")
        return
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    print(
        "overlapped slices: predicted ms per step (forward + backward) of each stage by slice "
        f"count (overlap {timing.overlap:g}, {timing.slice_overhead * 1e6:.0f} us per slice)"
    )
    print(text_table(["stage", "chosen"] + [""] * (width - 2), rows))
    before = sum(times[1] for times in report.values())
    after = sum(times[chosen.get(m, 1)] for m, times in report.items())
    print(
        f"these stages: {before * 1e3:.3f} ms blocking, {after * 1e3:.3f} ms with the chosen "
        f"slices ({before / after:.2f}x)"
    )


def _compare(rec, plan: Plan, n: int, args, price) -> None:
    """Predicted communication time of this plan and of the bytes-only plan."""
    from dsp.parallelize import compile_plan
    from dsp.parallelize.cost import act_costs, resolve_rests

    def seconds(p: Plan) -> float:
        hooks = compile_plan(resolve_rests(p, rec.trace), rec.decl)
        by_module = {}
        for h in hooks:
            by_module.setdefault(h.module, []).append(h)
        total = 0.0
        for call in rec.trace.calls:
            for h in by_module.get(call.module, ()):
                total += sum(price(a, f, b) for a, f, b in act_costs(h, call, rec.trace, n))
        return total

    by_bytes = rec.plan(n, even_only=args.even_only)
    placed = _unsliced(plan)  # slices are priced below (their time, not only their messages)
    mine, other = seconds(placed), seconds(by_bytes)
    same = "the same placement as" if by_bytes == placed else "a different placement from"
    print(
        f"on {args.cluster} (bf16): this plan's placement communicates {mine * 1e3:.3f} ms per "
        f"step blocking; it is {same} the bytes-only planner's ({other * 1e3:.3f} ms)"
    )


def run(args) -> int:
    from dsp.models import build_model

    n = args.world_size
    try:
        with torch.device("meta"):
            model = build_model(args.model)
        rec = record(model, example_inputs(args.model, model, args))
        price = _price(args.cluster, n) if args.cluster else None
        if args.chunks == "auto" and not args.cluster:
            raise PlanError("--chunks auto chooses from predicted time: give --cluster too")
        if args.chunks not in (None, 1) and args.plan:
            raise PlanError("--chunks slices the planner's stages; a --plan file has its own")
        timing = _timing(args.cluster, n) if args.chunks == "auto" else None
        plan = (
            Plan.from_json(args.plan.read_text())
            if args.plan
            else rec.plan(
                n, even_only=args.even_only, price=price, chunks=args.chunks, timing=timing
            )
        )
        check_plan(plan, model)
        cost = rec.cost(plan, n, even_only=args.even_only)
    except (PlanError, KeyError, ValueError) as e:
        msg = e.args[0] if e.args else e
        print(f"dsp plan: {'dry run failed' if args.dry_run else 'error'}: {msg}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{d}={v}" for d, v in rec.trace.sizes)
    source = f"plan {args.plan}" if args.plan else "planner's plan"
    print(f"dsp plan: {args.model}, N={n}, {sizes} (float32); {source}")
    print(plan.table([human_bytes(cost.bytes(f"stage {i}")) for i in range(len(plan.stages))]))
    rows = [
        [f"split {s.name}", "entry", human_bytes(cost.bytes(f"split {s.name}"))]
        for s in plan.streams
    ]
    rows += [
        [f"gather {s.name}", "exit", human_bytes(cost.bytes(f"gather {s.name}"))]
        for s in plan.streams
    ]
    rows.append(
        [
            "switches, gathers",
            "inside",
            human_bytes(cost.total - sum(cost.bytes(r[0]) for r in rows)),
        ]
    )
    print(text_table(["collective", "where", "bytes"], rows))
    print(
        f"total: {cost.total} bytes ({human_bytes(cost.total)}) over all ranks, forward "
        f"{human_bytes(cost.total_forward)} + backward {human_bytes(cost.total_backward)}"
    )
    try:
        hand = rec.cost(hand_plan(model), n).total
        print(
            f"hand-written plan (the paper's placement): {hand} bytes ({human_bytes(hand)}); "
            f"this plan sends {cost.total / hand:.3f} of it"
        )
    except PlanError as e:
        print(f"hand-written plan (the paper's placement) is not legal here: {e}")
    if price is not None:
        _compare(rec, plan, n, args, price)
    if timing is not None:
        _slices(rec, plan, n, timing)
    if args.json:
        args.json.write_text(plan.to_json() + "\n")
        print(f"plan written to {args.json}")
    if args.dry_run:
        print(f"dry run: OK ({len(plan.stages)} stages, world size {n}, no process group used)")
    return 0
