"""The cost model's saved activations equal dsp.memory's measurement within 10%."""

import pytest

from dsp.sim.memory import activation_bytes, model_state_bytes
from dsp.sim.workload import Workload
from tests.sim import _cases

SHAPE = (1, 8, 12, 16)  # B, T, H, W


def _workload(model, strategy, n):
    return _cases.workload(model, strategy, n, SHAPE)


@pytest.mark.parametrize("model", ["stdit-tiny", "latte-tiny"])
def test_single_process_saved_activations(pools, model):
    measured = pools.run(1, _cases.measure, model, "none", SHAPE)[0]["saved"]
    predicted = activation_bytes(_workload(model, "none", 1))["saved"]
    assert predicted == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("strategy", ["dsp", "ulysses", "ring", "megatron_sp", "usp"])
def test_per_rank_saved_activations(pools, strategy):
    n = 2
    measured = pools.run(n, _cases.measure, "stdit-tiny", strategy, SHAPE)
    w = _workload("stdit-tiny", strategy, n)
    for r, m in enumerate(measured):
        assert activation_bytes(w, r)["saved"] == pytest.approx(m["saved"], rel=0.10)


def test_zero_stages_shard_model_state():
    base = Workload(sp=8, dp=2, dp_style="ddp")
    p = base.shape.params
    assert model_state_bytes(base) == {"params": 2 * p, "grads": 2 * p, "optimizer": 12 * p}
    z2 = model_state_bytes(Workload(sp=8, dp=2, dp_style="zero2"))
    assert z2 == pytest.approx({"params": 2 * p, "grads": 2 * p / 16, "optimizer": 12 * p / 16})
    fsdp = model_state_bytes(Workload(sp=8, dp=2, dp_style="fsdp"))
    assert fsdp["params"] == pytest.approx(2 * p / 16)
