"""Every model and strategy: the cost model's bytes, FLOPs and memory against real runs.

The axial transformer and the Evoformer (and DSP's planner plan on Latte) have no closed
forms; the simulator costs them by running the engine for one rank on meta tensors
(:mod:`dsp.sim.traced`). Real multi-rank fp32 steps here measure bytes (``dsp.comm_log``),
FLOPs (``torch.utils.flop_counter``, attention as matmuls) and saved activations
(``dsp.memory``) on every rank at N = 2, 3, 4.
"""

import pytest
import torch

from dsp.models import build_model
from dsp.parallelize import PlanError
from dsp.sim.flops import step_flops
from dsp.sim.memory import activation_bytes
from dsp.sim.volume import sp_bytes
from dsp.strategies import get_strategy
from tests.sim import _cases

AXIAL = (1, 5, 10, 14)  # B, T, H, W: T = 5, H = 5, W = 7 patches, uneven over 2, 3, 4
EVO = (1, 5, 7)  # B, M, R
DIT = (1, 5, 6, 10)  # B, T, H, W: T = 5, S = 15
CASES = [  # (model, strategy, shape, options): what the engine can run
    ("axial-tiny", "dsp", AXIAL, None),
    ("evoformer-tiny", "dsp", EVO, None),
    ("latte-tiny", "dsp", DIT, None),  # the planner's plan (no closed form)
]


def _workload(name, strategy, shape, n, options=None):
    if name.startswith("evoformer"):
        b, m, r = shape
        sizes = {"msa": m, "residues": r, **(options or {})}
        return _cases.workload(name, strategy, n, (b, 1, 1, 1), **sizes)
    return _cases.workload(name, strategy, n, shape, **(options or {}))


def _usp(n):
    return {"ulysses_degree": 2 if n == 4 else n}


def _dit_cases(n):
    """Every strategy on STDiT and Latte (the closed forms; DSP as the paper's placement)."""
    return [
        (m, s, DIT, {"plan": "hand"} if s == "dsp" else _usp(n) if s == "usp" else None)
        for m in ("stdit-tiny", "latte-tiny")
        for s in ("dsp", "ulysses", "ring", "megatron_sp", "usp")
    ]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_model_and_strategy_matches_real_runs(pools, n):
    """Bytes on every rank exactly, FLOPs within 5%, saved activations within 10%, against
    one real step per (model, strategy) the engine can run, at N = 2, 3, 4 (uneven sizes);
    one process (strategy none) for every model."""
    if n == 1:
        cases = [(m, "none", shape, None) for m, _, shape, _ in CASES]
        cases.append(("stdit-tiny", "none", DIT, None))
    else:
        cases = CASES + _dit_cases(n)
    measured = pools.run(n, _cases.measure_many, cases)
    for i, (name, strategy, shape, options) in enumerate(cases):
        w = _workload(name, strategy, shape, n, options)
        dit = name.startswith(("stdit", "latte"))
        assert w.closed_form == (i >= len(CASES) if n > 1 else dit)
        for r in range(n):
            got, want = sp_bytes(w, r), measured[r][i]
            what = f"{name} {strategy} N={n} rank {r}"
            assert (got["forward"], got["backward"]) == (want["forward"], want["backward"]), what
            flops = step_flops(w, r, attn_bwd=2.0)["total"]  # attention as matmuls: 2x
            assert flops == pytest.approx(want["flops"], rel=0.05), what
            saved = activation_bytes(w, r)["saved"]
            assert saved == pytest.approx(want["saved"], rel=0.10), what


def _engine_error(name, strategy, shape, n):
    """The error the engine raises for ``strategy`` on ``name`` (fake group of ``n``): the
    strategy's plan generator, then the dry run (``dsp plan --dry-run``)."""
    from dsp.sim import traced

    w = _workload(name, strategy, shape, n)
    with torch.device("meta"):
        model = build_model(name)
    x = traced.inputs(model, w)
    with traced._fake_group(n, 0):
        try:
            plan = get_strategy(strategy).make_plan(model, x)
            from dsp.parallelize import record

            record(model, x).cost(plan, n)
        except Exception as e:  # noqa: BLE001 - compared below
            return e
    return None


@pytest.mark.parametrize(
    "name,shape,strategy",
    [
        ("axial-tiny", AXIAL, "ulysses"),
        ("axial-tiny", AXIAL, "ring"),
        ("axial-tiny", AXIAL, "usp"),
        ("axial-tiny", AXIAL, "megatron_sp"),
        ("evoformer-tiny", EVO, "ulysses"),
        ("evoformer-tiny", EVO, "ring"),
        ("evoformer-tiny", EVO, "usp"),
        ("evoformer-tiny", EVO, "megatron_sp"),
    ],
)
def test_what_the_engine_cannot_run_the_simulator_refuses_alike(name, shape, strategy):
    """Ulysses / Ring / USP need every stage over the resting dim to be an attention: the
    plan generator's PlanError; Megatron-SP on the axial model: the dry run's PlanError; on
    the Evoformer (two streams) the plan generator's own error."""
    from dsp.sim.hardware import cluster
    from dsp.sim.step import simulate

    want = _engine_error(name, strategy, shape, 2)
    assert want is not None
    with pytest.raises(type(want)) as got:
        simulate(_workload(name, strategy, shape, 2), cluster("8xh100-nvlink"))
    assert str(got.value) == str(want)
    if strategy != "megatron_sp":
        assert isinstance(got.value, PlanError) and "only attentions" in str(got.value)


@pytest.mark.parametrize("strategy", ["dsp", "ulysses", "ring", "megatron_sp", "usp"])
@pytest.mark.parametrize("n", [2, 4])
def test_engine_on_meta_equals_the_closed_forms(strategy, n):
    """STDiT, where both exist: the engine's step on meta tensors sends exactly the bytes of
    docs/communication.md's formulas on every rank (DSP: the paper's placement, which they
    describe; the planner's plan sends the same in total); FLOPs within 5%. (Memory: both
    against dsp.memory's measurement, above.)"""
    import dataclasses

    from dsp.sim import traced

    w = _workload("stdit-tiny", strategy, DIT, n, {"plan": "hand", **_usp(n)})
    assert w.closed_form
    total = 0
    for r in range(n):
        c = traced._rank_cost(w, r)  # the engine's step, bypassing the closed forms
        fwd = sum(t.bytes for t in c.transfers if t.phase == "forward")
        bwd = sum(t.bytes for t in c.transfers if t.phase == "backward")
        want = sp_bytes(w, r)
        assert (fwd, bwd) == (want["forward"], want["backward"])
        f = c.flops  # the fused kernel's backward counted as 2.5x its forward (FlashAttention)
        flops = f["forward"] + f["backward"] - f["attn_backward"] + 2 * f["attn_forward"]
        assert f["attn_backward"] == pytest.approx(2.5 * f["attn_forward"])
        assert flops == pytest.approx(step_flops(w, r, attn_bwd=2.0)["total"], rel=0.05)
        total += fwd + bwd
    auto = dataclasses.replace(w, plan="auto")
    auto_total = 0
    for r in range(n):
        c = traced._rank_cost(auto, r)
        auto_total += sum(t.bytes for t in c.transfers)
    assert auto_total == total


def test_activation_checkpointing_matches_a_checkpointed_run(pools):
    """As dsp train checkpoints (each block recomputed in backward, its hooks included): the
    cost model's bytes equal dsp.comm_log's, its FLOPs the counter's within 5%, for an
    engine-costed model and a closed form, every rank, N = 2."""
    n = 2
    cases = [
        ("axial-tiny", "dsp", AXIAL, {"checkpoint": True}),
        ("evoformer-tiny", "dsp", EVO, {"checkpoint": True}),
        ("stdit-tiny", "dsp", DIT, {"checkpoint": True, "plan": "hand"}),
    ]
    measured = pools.run(n, _cases.measure_many, cases)
    for i, (name, strategy, shape, options) in enumerate(cases):
        plan = {"plan": options["plan"]} if "plan" in options else {}
        w = _workload(name, strategy, shape, n, {"activation_checkpointing": True, **plan})
        for r in range(n):
            got, want = sp_bytes(w, r), measured[r][i]
            what = f"{name} N={n} rank {r}"
            assert (got["forward"], got["backward"]) == (want["forward"], want["backward"]), what
            flops = step_flops(w, r, attn_bwd=2.0)["total"]
            assert flops == pytest.approx(want["flops"], rel=0.05), what


def test_activation_checkpointing_keeps_block_inputs():
    """Engine-costed: checkpointing keeps less, recomputes the blocks' forward (FLOPs and
    the collectives inside them, issued again in backward)."""
    import dataclasses

    w = _workload("axial-tiny", "dsp", AXIAL, 2)
    ac = dataclasses.replace(w, activation_checkpointing=True)
    assert activation_bytes(ac)["saved"] < activation_bytes(w)["saved"]
    assert activation_bytes(ac)["peak"] <= activation_bytes(w)["saved"]
    plain, again = step_flops(w), step_flops(ac)
    assert 0 < again["recompute"] < plain["forward"]
    assert sp_bytes(ac)["backward"] > sp_bytes(w)["backward"]


def test_ranks_costed_cover_every_shape_pattern():
    """One rank per pattern of long and short shards: the others cost the same."""
    from dsp.sim import traced

    w = _workload("axial-tiny", "dsp", AXIAL, 4)  # T = 5, H = 5, W = 7 over 4: 1, 1, 3 long
    assert traced.ranks(w) == [0, 1, 3]
    costs = [sp_bytes(w, r) for r in range(4)]
    assert costs[1] == costs[2]
    even = _workload("axial-tiny", "dsp", (1, 4, 8, 8), 4)
    assert traced.ranks(even) == [0]
