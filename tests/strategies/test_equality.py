"""Every strategy on every model equals the single-process run, forward and backward."""

import pytest

from tests.strategies import _cases

SHAPE = (2, 5, 6, 10)  # B, T, H, W -> T = 5 frames, S = 3 x 5 = 15 patches: uneven over 2, 3, 4


@pytest.mark.parametrize("model", ["stdit-tiny", "latte-tiny"])
@pytest.mark.parametrize("strategy", ["dsp", "ulysses", "ring", "megatron_sp"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_equals_single_process(pools, model, strategy, n):
    results = pools.run(n, _cases.equality, model, strategy, SHAPE)
    measured = sum(r["forward"] + r["backward"] for r in results)
    assert measured == results[0]["predicted"] > 0  # every byte the dry run of its plan says


@pytest.mark.parametrize("model", ["stdit-tiny", "latte-tiny"])
@pytest.mark.parametrize("n,u", [(2, 1), (2, 2), (3, 1), (3, 3), (4, 2)])
def test_usp_equals_single_process(pools, model, n, u):
    results = pools.run(n, _cases.equality, model, "usp", SHAPE, {"ulysses_degree": u})
    assert sum(r["forward"] + r["backward"] for r in results) == results[0]["predicted"]
