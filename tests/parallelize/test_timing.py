"""The planner's choice of overlapped slices (Stage.chunks) from predicted time."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dsp.cli.lists import chunk_counts
from dsp.models import build_model
from dsp.parallelize import PlanError, Timing, choose_chunks, record
from dsp.parallelize.timing import stage_time
from dsp.sim.hardware import cluster
from dsp.sim.plan_price import timing
from dsp.strategies import meta_like
from tests.parallelize import _cases


def _recording(shape=(16, 16, 16)):
    with torch.device("meta"):
        model = build_model("stdit-tiny")
        inputs = _cases.make_inputs("stdit-tiny", model, shape=shape)[:3]
    inputs = meta_like(*(t.float() if t.is_floating_point() else t for t in inputs))
    return record(model, inputs), model


def _per_byte(seconds):
    """A price of ``seconds`` per byte sent (forward and backward alike)."""
    return lambda act, f, b: seconds * (f + b)


def test_recording_counts_each_calls_forward_flops():
    rec, model = _recording()
    calls = {c.module: c for c in rec.trace.calls}
    proj = calls["x_embedder.proj"]  # a Conv3d patch embedder: 2 x multiply-adds
    conv = model.x_embedder.proj
    kernel = conv.kernel_size[0] * conv.kernel_size[1] * conv.kernel_size[2]
    assert proj.flops == 2 * math.prod(proj.outs[0].shape) * conv.in_channels * kernel
    block = calls["blocks.0"]  # modules inside a call are part of it
    inner = [c for c in rec.trace.calls if c.module.count(".") == 2 and "blocks.0." in c.module]
    assert block.flops >= sum(c.flops for c in inner) > 0


def test_stage_time_is_the_pipeline_formula():
    rec, _ = _recording()
    plan = rec.plan(2)
    st = next(s for s in plan.stages if s.kind == "compute" and s.shard != s.rest)
    calls = [c for c in rec.trace.calls if c.module == st.module]
    t = Timing(_per_byte(1e-9), flop_seconds=1e-12, training=False)
    total1, w, c = stage_time(st, plan, rec.trace, rec.decl, 2, t)
    assert total1 == pytest.approx(w + c) and w > 0 and c > 0
    assert c == pytest.approx(sum(x.flops for x in calls) / 2 * 1e-12)
    for k in (2, 4):
        sliced = dataclasses.replace(st, chunks=k)
        tk, wk, ck = stage_time(sliced, plan, rec.trace, rec.decl, 2, t)
        assert ck == pytest.approx(c) and wk == pytest.approx(w, rel=0.05)  # uneven rounding
        assert tk == pytest.approx(wk + ck - min(wk, ck) * (k - 1) / k)
        over = dataclasses.replace(t, slice_overhead=1e-3, overlap=0.5)
        assert stage_time(sliced, plan, rec.trace, rec.decl, 2, over)[0] == pytest.approx(
            wk + ck - 0.5 * min(wk, ck) * (k - 1) / k + (k - 1) * 1e-3 * len(calls)
        )
    train = dataclasses.replace(t, training=True)  # backward: the same bytes, 2x the compute
    _, w2, c2 = stage_time(st, plan, rec.trace, rec.decl, 2, train)
    assert c2 == pytest.approx(3 * c)


def test_choice_follows_the_ratio_of_communication_to_compute():
    rec, _ = _recording()
    plan = rec.plan(2)
    movable = [s for s in plan.stages if s.kind == "compute" and s.shard != s.rest]
    assert movable

    def chosen(**kw):
        t = Timing(**{"price": _per_byte(1e-9), "flop_seconds": 1e-12, **kw})
        got, report = choose_chunks(plan, rec.trace, rec.decl, 2, t)
        assert set(report) == {s.module for s in movable}
        most = kw.get("max_chunks", 8)  # and at most 16 frames / 2 ranks
        assert all(sorted(v) == [k for k in (1, 2, 4, 8) if k <= most] for v in report.values())
        return [s.chunks for s in got.stages if s.module in report]

    assert chosen() == [8] * len(movable)  # both comparable, free slices: the most
    assert chosen(max_chunks=4) == [4] * len(movable)
    assert chosen(overlap=0.0) == [None] * len(movable)  # ranks share cores: no gain
    assert chosen(slice_overhead=1.0) == [None] * len(movable)  # slices cost more than they hide
    assert chosen(price=_per_byte(0.0)) == [None] * len(movable)  # nothing to hide
    # a cost per slice between 1/32 and 1/8 of what can be hidden: 4 slices beat 2 and 8
    t = Timing(_per_byte(1e-9), 1e-12, training=False)
    _, w, c = stage_time(movable[0], plan, rec.trace, rec.decl, 2, t)
    assert chosen(training=False, slice_overhead=min(w, c) / 16) == [4] * len(movable)


def test_auto_needs_timing_and_a_run_recording():
    rec, _ = _recording()
    with pytest.raises(PlanError, match="timing="):
        rec.plan(2, chunks="auto")
    with pytest.raises(PlanError, match="whole number"):
        rec.plan(2, chunks=0)
    with torch.device("meta"):
        model = build_model("stdit-tiny")
    declared = record(model, {"B": 2, "T": 16, "S": 64, "C": 32})
    t = Timing(_per_byte(1e-9), 1e-12)
    with pytest.raises(PlanError, match="no FLOPs"):
        declared.plan(2, chunks="auto", timing=t)


def test_cluster_timing_and_presets():
    c = cluster("8xh100-nvlink")
    t = timing(c, 8)
    assert t.flop_seconds == pytest.approx(1 / c.gpu.flops) and t.overlap == 1.0
    assert cluster(dataclasses.asdict(dataclasses.replace(c, overlap=0.0))).overlap == 0.0
    with pytest.raises(ValueError, match="overlap must be in"):
        dataclasses.replace(c, overlap=1.5)
    rec, _ = _recording((64, 64, 64))
    plan = rec.plan(8, chunks="auto", timing=t)  # an H100 node: each stage's fastest k
    _, report = choose_chunks(rec.plan(8), rec.trace, rec.decl, 8, t)
    assert report
    for st in plan.stages:
        if st.module in report:
            times, k = report[st.module], st.chunks or 1
            best = min(times.values())
            assert times[k] == best or (k == 1 and times[1] - best < t.min_gain * times[1])
    assert rec.cost(plan, 8).total > 0  # a plan the dry run accepts


def test_flops_of_real_and_meta_recordings_agree():
    """On real CPU tensors sdpa runs a fused kernel the flop counter has no formula for;
    the recording counts it from the shapes, as on meta."""
    torch.manual_seed(0)
    model = build_model("stdit-tiny")
    inputs = _cases.make_inputs("stdit-tiny", model, shape=(4, 8, 8))[:3]
    inputs = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    real = {c.module: c.flops for c in record(model, inputs).trace.calls}
    meta = {c.module: c.flops for c in record(model, meta_like(*inputs)).trace.calls}
    assert real == meta and real["blocks.0.attn_temp"] > 0


def test_chunks_need_the_planners_plan():
    from dsp.strategies.plans import dsp_plan

    with torch.device("meta"):
        model = build_model("stdit-tiny")
    with pytest.raises(ValueError, match="needs plan='auto' and example inputs"):
        dsp_plan(model, 2, plan="hand", chunks=2)


def test_timing_rejects_nonsense():
    with pytest.raises(ValueError, match="overlap"):
        Timing(_per_byte(1e-9), 1e-12, overlap=2.0)


def test_chunk_counts_flag():
    import argparse

    assert chunk_counts("1,4,auto") == [1, 4, "auto"]
    with pytest.raises(argparse.ArgumentTypeError, match="slice count"):
        chunk_counts("0")


@pytest.mark.parametrize("n", [2, 3])
def test_auto_chunks_equal_one_process(pools, n):
    results = pools.run(n, _cases.equality, "stdit-tiny", "chunks:auto", 1e-9, (7, 6, 10))
    chunked = [st for st in results[0]["plan"]["stages"] if st.get("chunks")]
    assert chunked, results[0]["plan"]
    assert sum(r["forward"] for r in results) == results[0]["predicted_forward"]
    assert sum(r["backward"] for r in results) == results[0]["predicted_backward"]
