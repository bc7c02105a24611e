"""The planner: optimal bytes (checked by brute force), ties towards even shards,
``even_only``, declared sizes, three sequence dims, and never worse than the paper's placement."""

import itertools

import pytest
import torch

import dsp.parallelize as P
from dsp.models import build_model
from dsp.models.plans import hand_plan
from dsp.parallelize import Plan, PlanError, Stage

SIZES = {
    "stdit-tiny": {"B": 1, "T": 5, "S": 15, "C": 32},
    "latte-tiny": {"B": 1, "T": 5, "S": 15, "C": 32},
    "axial-tiny": {"B": 1, "T": 5, "H": 6, "W": 7, "C": 32},
    "evoformer-tiny": {"B": 1, "M": 5, "R": 7, "I": 7, "J": 7, "Cm": 16, "Cz": 8},
}


def meta_model(name, **overrides):
    with torch.device("meta"):
        return build_model(name, **overrides)


def every_plan(rec: P.Recording, n: int):
    """All plans: entry dims, a relayout (or none) at every boundary, every legal stage shard."""
    streams = {s.name: s for s in rec.streams}
    legal = [d for s in rec.streams for d in s.seq if rec.trace.size(d) >= n]
    entries = [[d for d in s.seq if d in legal] for s in rec.streams]
    bounds = [(m, s) for s, ms in rec.decl.boundaries.items() for m in ms]
    stage_opts = []
    for module, (stream, compute) in rec.stages.items():
        smap = rec.decl.shard_maps.get(module)
        opts = []
        for d in streams[stream].seq:
            if d in compute or d not in legal or (smap and d not in smap):
                continue
            out = ("pair", smap[d]) if smap else (None, None)
            opts.append(Stage(module, stream, compute, d, "compute", *out))
        stage_opts.append(opts)
    gathers = [Stage(op, _stream_of(rec, op), kind="gather_output") for op in rec.decl.operands]
    for entry in itertools.product(*entries):
        planned = [
            P.Stream(s.name, s.dims, s.entry, s.exit, e, s.seq, s.arg, s.out)
            for s, e in zip(rec.streams, entry)
        ]
        for relayouts in itertools.product(*[[None, *streams[s].seq] for _, s in bounds]):
            rel = [
                Stage(m, s, kind="relayout", shard=d) for (m, s), d in zip(bounds, relayouts) if d
            ]
            for chosen in itertools.product(*stage_opts):
                yield Plan(tuple(planned), tuple(rel) + chosen + tuple(gathers))


def _stream_of(rec, module):
    dims = rec.decl.operands[module][1]
    return next(s.name for s in rec.streams if set(dims) <= set(s.seq))


@pytest.mark.parametrize(
    "name,n,overrides",
    [
        ("axial-tiny", 3, {}),
        ("latte-tiny", 2, {}),
        ("evoformer-tiny", 4, {}),
        ("stdit-tiny", 4, {}),
    ],
)
def test_planner_is_optimal_by_brute_force(name, n, overrides):
    rec = P.record(meta_model(name, **overrides), SIZES[name])
    best = None
    count = 0
    for plan in every_plan(rec, n):
        try:
            total = rec.cost(plan, n).total
        except PlanError:
            continue
        count += 1
        best = total if best is None else min(best, total)
    assert count > 4
    assert rec.cost(rec.plan(n), n).total == best


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_never_more_bytes_than_the_hand_plan(name, n):
    model = meta_model(name)
    rec = P.record(model, SIZES[name])
    try:
        hand = rec.cost(hand_plan(model), n).total
    except PlanError:  # a dim the paper's placement shards is shorter than n
        hand = None
    planned = rec.cost(rec.plan(n), n).total
    assert hand is None or planned <= hand


def test_ties_go_towards_even_shards():
    model = meta_model("stdit-tiny")
    # a switch T <-> S costs the same either way: the resting dim is the more even one
    uneven_t = P.plan_model(model, {"B": 1, "T": 5, "S": 16, "C": 32}, 4)
    assert uneven_t.streams[0].shard == "S"
    uneven_s = P.plan_model(model, {"B": 1, "T": 8, "S": 15, "C": 32}, 4)
    assert uneven_s.streams[0].shard == "T"


def test_even_only():
    rec = P.record(meta_model("axial-tiny"), {"B": 1, "T": 6, "H": 8, "W": 5, "C": 32})
    plan = rec.plan(2, even_only=True)
    used = {plan.streams[0].shard} | {st.shard for st in plan.stages}
    assert all(rec.trace.size(d) % 2 == 0 for d in used)
    assert rec.cost(rec.plan(2), 2).total <= rec.cost(plan, 2, even_only=True).total
    # only T = 6 divides by 3 and attn_t needs T whole: nothing can be switched, so the
    # planner's last resort runs it whole (gather, compute, keep this rank's part)
    kinds = {st.module: st.kind for st in rec.plan(3, even_only=True).stages}
    assert kinds["blocks.0.attn_t"] == "whole" and kinds["blocks.0.attn_h"] == "compute"
    with pytest.raises(PlanError, match=r"attn_t.*even_only"):
        rec.plan(3, even_only=True, kinds=("compute",))  # without it: a clear error
    kinds = {st.module: st.kind for st in rec.plan(4, even_only=True).stages}
    assert kinds["blocks.0.attn_h"] == "whole"  # H = 8 at rest; T = 6, W = 5 over 4: no
    with pytest.raises(PlanError, match="not divisible"):
        rec.cost(rec.plan(3), 3, even_only=True)  # W = 5 or H = 8 is used over 3 ranks


def test_declared_sizes_plan_like_a_recording():
    torch.manual_seed(0)
    model = build_model("axial-tiny")
    recorded = P.plan_model(model, (torch.randn(1, 4, 5, 12, 14),), 3)
    declared = P.plan_model(model, {"B": 1, "T": 5, "H": 6, "W": 7, "C": 32}, 3)
    assert recorded == declared


def test_three_sequence_dims():
    model = meta_model("axial-tiny", depth=1)
    rec = P.record(model, {"B": 1, "T": 8, "H": 2, "W": 8, "C": 32})
    plan = rec.plan(4)  # H = 2 < 4 ranks: never sharded; attn_t runs on W, the rest on T
    assert plan.streams[0].shard == "T"
    assert [(st.module, st.shard) for st in plan.stages] == [
        ("blocks.0.attn_t", "W"),
        ("blocks.0.attn_h", "T"),
        ("blocks.0.attn_w", "T"),
    ]


def test_recording_on_meta_costs_no_memory():
    x = torch.empty(1, 4, 64, 128, 128, device="meta")  # 64 frames of 64 x 64 patches
    model = meta_model("stdit-xl/2", depth=2)
    rec = P.record(
        model, (x, torch.zeros(1, device="meta"), torch.empty(1, 8, 4096, device="meta"))
    )
    assert dict(rec.trace.sizes)["S"] == 4096
    assert rec.cost(rec.plan(8), 8).total == rec.cost(hand_plan(model), 8).total


def test_user_overrides_and_the_planner_completes_the_rest():
    from tests.parallelize._folded import folded

    model, inputs = folded.make()
    rec = P.record(model, inputs, streams=folded.STREAMS, declare=folded.DECLARE)
    free = rec.plan(3)
    kinds = {st.module: st.kind for st in free.stages}
    assert kinds["full"] == "heads"
    ring = rec.plan(3, overrides={"full": "ring"})
    assert {st.module: st.kind for st in ring.stages}["full"] == "ring"
    assert rec.cost(ring, 3).total > rec.cost(free, 3).total
    # whole only by choice: at N = 3 its all-gather + reduce-scatter (2 (N-1) M) sends less
    # than Ulysses' four switches (4 (N-1)/N M), but every rank would compute all of it
    whole = rec.plan(3, overrides={"full": "whole"})
    assert {st.module: st.kind for st in whole.stages}["full"] == "whole"
    assert rec.cost(whole, 3).total < rec.cost(free, 3).total
    pinned = rec.plan(3, overrides={"temporal.*": ("compute", "S"), "spatial.*": "compute"})
    assert all(st.shard == "S" for st in pinned.stages if st.module.startswith("temporal."))
    with pytest.raises(PlanError, match=r"override 'temporal.\*' -> \('compute', 'F'\).*options"):
        rec.plan(3, overrides={"temporal.*": ("compute", "F")})  # it computes over F


def test_a_price_per_collective_steers_the_search():
    """A link where all-to-alls are slow (a price per collective, as a cluster model gives)
    turns the full attention from Ulysses' heads into ring attention; bytes prefer heads."""
    from tests.parallelize._folded import folded

    model, inputs = folded.make()
    rec = P.record(model, inputs, streams=folded.STREAMS, declare=folded.DECLARE)

    def slow_all_to_all(act, fwd, bwd):
        a2a = act.op == "switch" or act.kind in ("heads", "usp")
        return (fwd + bwd) * (10 if a2a else 1)

    by_bytes = {st.module: st.kind for st in rec.plan(3).stages}
    by_time = {st.module: st.kind for st in rec.plan(3, price=slow_all_to_all).stages}
    assert by_bytes["full"] == "heads" and by_time["full"] == "ring"


def test_time_on_a_cluster_changes_the_plan_where_latency_dominates():
    """On NVLink the folded example's tiny full attention is latency-bound: ring attention's
    3 messages (1 forward, 2 backward at N = 2) beat Ulysses' 8 all-to-alls though they send
    more bytes; the time-aware plan is faster in the link model, the bytes plan smaller."""
    from dsp.parallelize import compile_plan
    from dsp.parallelize.cost import act_costs
    from dsp.sim.hardware import cluster
    from dsp.sim.plan_price import link_price
    from tests.parallelize._folded import folded

    model, inputs = folded.make()
    rec = P.record(model, inputs, streams=folded.STREAMS, declare=folded.DECLARE)
    price = link_price(cluster("8xh100-nvlink"), 2)

    def seconds(plan):
        by_module = {}
        for hook in compile_plan(plan, rec.decl):
            by_module.setdefault(hook.module, []).append(hook)
        return sum(
            price(a, f, b)
            for call in rec.trace.calls
            for hook in by_module.get(call.module, ())
            for a, f, b in act_costs(hook, call, rec.trace, 2)
        )

    by_bytes, by_time = rec.plan(2), rec.plan(2, price=price)
    kinds = [{st.module: st.kind for st in p.stages}["full"] for p in (by_bytes, by_time)]
    assert kinds == ["heads", "ring"]
    assert seconds(by_time) < seconds(by_bytes)
    assert rec.cost(by_time, 2).total > rec.cost(by_bytes, 2).total
