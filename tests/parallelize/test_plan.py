"""Plans are plain data: printable, serialisable, comparable."""

import json

import pytest
import torch

import dsp.parallelize as P
from dsp.models import build_model
from dsp.models.plans import hand_plan
from dsp.parallelize import Plan, PlanError, Stage, Stream
from tests.parallelize._cases import make_inputs

MODELS = ["stdit-tiny", "latte-tiny", "axial-tiny", "evoformer-tiny"]


@pytest.fixture(scope="module")
def recordings():
    out = {}
    for name in MODELS:
        torch.manual_seed(0)
        model = build_model(name).double()
        out[name] = (model, P.record(model, make_inputs(name, model)))
    return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_plans_round_trip_through_json(recordings, name, n):
    model, rec = recordings[name]
    for plan in (rec.plan(n), hand_plan(model)):
        text = plan.to_json()
        json.loads(text)  # valid JSON
        again = Plan.from_json(text)
        assert again == plan and hash(again) == hash(plan)
        assert Plan.from_dict(plan.to_dict()) == plan
        table = str(plan)
        assert all(st.module in table for st in plan.stages)
        assert all(s.name in table for s in plan.streams)


def test_plans_compare_by_value(recordings):
    model, rec = recordings["latte-tiny"]
    # a second model and recording, built independently, plans the same value
    torch.manual_seed(0)
    other = build_model("latte-tiny").double()
    other_plan = P.record(other, make_inputs("latte-tiny", other)).plan(2)
    plan = rec.plan(2)
    assert plan == other_plan and plan is not other_plan
    assert plan == P.Plan.from_json(other_plan.to_json())
    assert rec.plan(2) != hand_plan(model)
    assert len({plan, other_plan, P.Plan.from_json(plan.to_json())}) == 1


def test_table_with_bytes(recordings):
    _, rec = recordings["evoformer-tiny"]
    plan = rec.plan(3)
    cost = rec.cost(plan, 3)
    table = plan.table([cost.bytes(f"stage {i}") for i in range(len(plan.stages))])
    assert "gather_output" in table and "pair:I" in table and "bytes" in table


def test_bad_plan_data_is_rejected():
    with pytest.raises(PlanError, match="kind must be one of"):
        Stage("blocks.0", "x", kind="shard")
    with pytest.raises(PlanError, match="sequences of names"):
        Stream("x", "BTSC", "blocks.0", "final_layer", "T")
    with pytest.raises(PlanError, match="not a plan"):
        Plan.from_dict({"stages": []})
    with pytest.raises(PlanError, match="unique"):
        s = Stream("x", ("B", "T", "C"), "a", "b", "T")
        Plan((s, s))


def test_defaults_are_filled_and_omitted():
    s = Stream("x", ["B", "T", "S", "C"], "blocks.0", "final_layer", "T")
    assert s.seq == ("T", "S") and s.dims == ("B", "T", "S", "C")
    st = Stage("blocks.0.attn", "x", "S", "T")
    assert st.compute == ("S",) and st.kind == "compute"
    d = Plan((s,), (st,)).to_dict()
    assert d["stages"] == [
        {"module": "blocks.0.attn", "stream": "x", "compute": ["S"], "shard": "T"}
    ]
