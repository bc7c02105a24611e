"""``dsp.parallelize`` with the planner's plan equals one process; it sends no more bytes than
the hand-written plan, and the dry run predicts the measured bytes exactly."""

import pytest

from tests.parallelize import _cases

MODELS = ["stdit-tiny", "latte-tiny", "axial-tiny", "evoformer-tiny"]
BEATS_HAND = {"latte-tiny", "evoformer-tiny"}  # relayouts / better resting dims pay off


def _total(results, phase):
    return sum(r[phase] for r in results)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_planner_plan_equals_single_process(pools, name, n):
    planner = pools.run(n, _cases.equality, name, "planner")
    hand = pools.run(n, _cases.equality, name, "hand")
    assert all(r["plan"] == planner[0]["plan"] for r in planner)  # every rank plans alike
    for results in (planner, hand):
        assert _total(results, "forward") == results[0]["predicted_forward"]
        assert _total(results, "backward") == results[0]["predicted_backward"]
    sent = _total(planner, "forward") + _total(planner, "backward")
    sent_hand = _total(hand, "forward") + _total(hand, "backward")
    assert sent <= sent_hand
    if name in BEATS_HAND:
        assert sent < sent_hand


def test_models_declared_as_data(pools):
    plans = pools.run(2, _cases.declared_as_data)
    stages = plans[0]["stages"]
    assert [s.get("kind", "compute") for s in stages] == ["compute", "gather_output"] * 2
