"""The cost model's bytes are docs/communication.md's formulas, and dsp.comm_log measures them."""

import dataclasses

import pytest

from dsp.models import build_model
from dsp.sim.volume import sp_bytes, transfers
from dsp.strategies.volume import expected_bytes
from tests.sim import _cases

STRATEGIES = ["dsp", "ulysses", "ring", "megatron_sp", "usp"]
SHAPES = {2: (2, 5, 6, 10), 3: (1, 7, 6, 6), 4: (2, 8, 8, 8)}  # (B, T, H, W): uneven T, S


def _workload(model, strategy, n, shape, **kw):
    u = 2 if (strategy == "usp" and n == 4) else None
    kw.setdefault("plan", "hand")  # the paper's placement: what the formulas describe
    return _cases.workload(
        model, strategy, n, shape, param_elem=4, dp_style="ddp", ulysses_degree=u, **kw
    )


@pytest.mark.parametrize("model", ["stdit-tiny", "latte-tiny", "stdit-xl/2"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_bytes_equal_the_formulas(model, strategy, n):
    w = _workload(model, strategy, n, SHAPES[n])
    if w.strategy == "megatron_sp" and n > w.shape.H:
        pytest.skip("megatron_sp needs sp <= heads")
    ref = build_model(model) if model.endswith("tiny") else None
    if ref is None:
        import torch

        with torch.device("meta"):
            ref = build_model(model)
    for r in range(n):
        got = sp_bytes(w, r)
        want = expected_bytes(
            strategy,
            ref,
            batch=w.batch,
            frames=w.T,
            patches=w.S,
            world_size=n,
            rank=r,
            elem_size=4,
            ulysses_degree=w.ulysses_degree,
        )
        assert (got["forward"], got["backward"]) == (want["forward"], want["backward"])


def test_recompute_repeats_the_blocks_forward_bytes():
    w = _workload("stdit-tiny", "dsp", 2, SHAPES[2])
    ac = dataclasses.replace(w, activation_checkpointing=True)
    plain, again = sp_bytes(w), sp_bytes(ac)
    gather = next(t.bytes for t in transfers(w) if t.what == "exit gather")
    assert again["backward"] == plain["backward"] + plain["forward"] - gather


def test_grad_sync_is_a_ring_all_reduce_of_replicated_grads():
    w = _workload("stdit-tiny", "dsp", 4, SHAPES[4])
    assert sp_bytes(w)["sync"] == 2 * 3 / 4 * w.shape.params * 4
    z2 = dataclasses.replace(w, dp_style="zero2", dp=2)
    assert sp_bytes(z2)["sync"] == pytest.approx(2 * 7 / 8 * w.shape.params * 4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_comm_log_measures_the_model(pools, strategy):
    """One multi-rank run per strategy: forward, backward and gradient-sync bytes per rank."""
    n, shape = 2, (1, 5, 6, 10)
    measured = pools.run(n, _cases.measure, "stdit-tiny", strategy, shape)
    w = _workload("stdit-tiny", strategy, n, shape)
    for r, m in enumerate(measured):
        want = sp_bytes(w, r)
        assert (m["forward"], m["backward"], m["sync"]) == (
            want["forward"],
            want["backward"],
            want["sync"],
        )
