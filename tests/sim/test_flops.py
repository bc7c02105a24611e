"""The cost model's FLOPs equal torch.utils.flop_counter's count of the same model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsp.models import build_model
from dsp.sim.flops import step_flops
from tests.sim import _cases

SHAPE = (2, 6, 8, 10)  # B, T, H, W


def _workload(model, strategy="none", n=1, mode="train", **kw):
    return _cases.workload(model, strategy, n, SHAPE, mode=mode, **kw)


@pytest.mark.parametrize("model", ["stdit-tiny", "latte-tiny"])
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_single_device_flops_match_flop_counter(model, mode):
    torch.manual_seed(0)
    net = build_model(model, zero_init=False, hidden_size=64, num_heads=4)
    for m in net.modules():
        if hasattr(m, "core"):
            m.core = _cases.math_core
    x, t, y = _cases.inputs(net, SHAPE)
    with FlopCounterMode(display=False) as fc:
        out = net(x, t, y)
        if mode == "train":
            out.sum().backward()
    w = _workload(model, mode=mode, overrides={"hidden_size": 64, "num_heads": 4})
    assert step_flops(w, attn_bwd=2.0)["total"] == pytest.approx(fc.get_total_flops(), rel=0.05)


def test_checkpointing_adds_one_forward_of_the_blocks():
    w = _workload("stdit-tiny")
    ac = _workload("stdit-tiny", activation_checkpointing=True)
    plain, again = step_flops(w), step_flops(ac)
    assert plain["total"] < again["total"] < plain["total"] + plain["forward"]


@pytest.mark.parametrize("strategy", ["dsp", "ulysses", "megatron_sp"])
def test_per_rank_flops_match_flop_counter(pools, strategy):
    """Each rank's count under a strategy (comm ops count 0 FLOPs)."""
    n = 2
    counted = pools.run(n, _cases.flops, "stdit-tiny", strategy, SHAPE, _cases.math_core)
    w = _workload("stdit-tiny", strategy, n)
    for r, c in enumerate(counted):
        assert step_flops(w, r, attn_bwd=2.0)["total"] == pytest.approx(c, rel=0.05)
