"""Bad plans fail at ``parallelize`` time (or in the dry run) with clear messages, before any
collective and without a process group."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dsp
import dsp.parallelize as P
from dsp.models import build_model
from dsp.models.plans import hand_plan
from dsp.parallelize import Plan, PlanError, Stage, Stream
from tests.parallelize._cases import make_inputs

X = Stream("x", ("B", "T", "S", "C"), "blocks.0", "final_layer", "T")


@pytest.fixture(scope="module")
def stdit():
    torch.manual_seed(0)
    return build_model("stdit-tiny", depth=1).double()


def test_no_process_group_is_needed_for_these_checks():
    assert not dist.is_initialized()


def test_missing_module(stdit):
    plan = Plan((X,), (Stage("blocks.0.atn_temp", "x", "T", "S"),))
    with pytest.raises(PlanError, match=r"'blocks.0.atn_temp'.*does not have.*blocks.0.attn_temp"):
        dsp.parallelize(stdit, plan)
    with pytest.raises(PlanError, match="'final_layr'"):
        dsp.parallelize(stdit, Plan((Stream("x", X.dims, "blocks.0", "final_layr", "T"),)))


def test_dim_the_tensor_does_not_have(stdit):
    plan = Plan((X,), (Stage("blocks.0.attn_temp", "x", "H", "S"),))
    with pytest.raises(PlanError, match=r"dim 'H'.*dims \('B', 'T', 'S', 'C'\): no dim 'H'"):
        dsp.parallelize(stdit, plan)
    with pytest.raises(PlanError, match="no dim 'W'"):
        dsp.parallelize(stdit, Plan((Stream("x", X.dims, "blocks.0", "final_layer", "W"),)))
    # a dim no stream has
    other = Stream("x", ("B", "T", "H", "C"), "blocks.0", "final_layer", "T")
    with pytest.raises(PlanError, match=r"'blocks.0.attn' \(compute_dim\) names .*'S'.*no stream"):
        P.validate(Plan((other,)), stdit, 2, make_inputs("stdit-tiny", stdit))
    # the stream's dims against the real tensor: (B, T, S, W, C) names 5 dims, x has 4
    five = Stream("x", ("B", "T", "S", "W", "C"), "blocks.0", "final_layer", "T")
    with pytest.raises(
        PlanError, match=r"has shape \(2, 5, 15, 32\) \(4 dims\), but its layout B T S W C has 5"
    ):
        P.validate(Plan((five,)), stdit, 2, make_inputs("stdit-tiny", stdit))


def test_stage_over_every_sequence_dim(stdit):
    plan = Plan((X,), (Stage("blocks.0", "x", ("T", "S"), "T"),))
    with pytest.raises(PlanError, match=r"every sequence dim.*gather.*another strategy"):
        dsp.parallelize(stdit, plan)

    class Full(nn.Module):  # attention over T and S at once: nothing left to shard
        compute_dim = ("T", "S")

        def forward(self, x):
            return x

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Full()])
            self.final_layer = nn.Identity()

        def forward(self, x):
            return self.final_layer(self.blocks[0](x))

    # the planner runs it whole (gather, compute, keep this rank's part): the last resort
    plan = P.plan_model(Toy(), (torch.randn(1, 4, 4, 2),), 2, streams=[X])
    assert [(st.module, st.kind) for st in plan.stages] == [("blocks.0", "whole")]


def test_plan_contradicting_the_model(stdit):
    plan = Plan((X,), (Stage("blocks.0.attn_temp", "x", "S", "T"),))
    with pytest.raises(PlanError, match=r"declares it computes over \('T',\).*plan says"):
        dsp.parallelize(stdit, plan)
    plan = Plan((X,), (Stage("blocks", "x", "T", "S"),))
    with pytest.raises(PlanError, match="contains 'blocks.0'.*inside the sharded region"):
        dsp.parallelize(stdit, plan)
    plan = Plan((X,), (Stage("blocks.0.attn", "x", kind="relayout", shard="S"),))
    with pytest.raises(PlanError, match="block boundary"):
        dsp.parallelize(stdit, plan)
    evo = build_model("evoformer-tiny", depth=1)
    plan = hand_plan(evo)
    plan = Plan(plan.streams, tuple(s for s in plan.stages if s.module != "blocks.0.tri_out.right"))
    with pytest.raises(PlanError, match=r"'blocks.0.tri_out' uses the output of .*right' whole"):
        dsp.parallelize(evo, plan)


def test_dry_run_catches_what_only_sizes_show(stdit):
    inputs = make_inputs("stdit-tiny", stdit)  # T = 5, S = 15
    only_spatial = Plan((X,), (Stage("blocks.0.attn", "x", "S", "T"),))  # forgot attn_temp
    with pytest.raises(PlanError, match=r"attn_temp' computes over \('T',\).*sharded on 'T'"):
        P.validate(only_spatial, stdit, 2, inputs)
    good = hand_plan(stdit)
    assert P.validate(good, stdit, 4, inputs).total > 0
    with pytest.raises(PlanError, match="length 5 is shorter than the world size 8"):
        P.validate(good, stdit, 8, inputs)
    with pytest.raises(PlanError, match="length 5 is not divisible by the world size 4"):
        P.validate(good, stdit, 4, inputs, even_only=True)
    with pytest.raises(PlanError, match="outside the sharded region"):
        P.validate(
            Plan((X,), good.stages + (Stage("x_embedder", "x", "T", "S"),)), stdit, 2, inputs
        )
    assert not dist.is_initialized()
