"""dsp.split and dsp.gather: placement, bytes and the gradient convention."""

import pytest

from tests.comm import _cases


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_placement_and_bytes(pools, n):
    assert all(pools.run(n, _cases.split_gather_placement, [(5, 3), (2, 7, 4), (3, 2, 5, 1)]))


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("dim", [0, 2, -1])
def test_gradients(pools, n, dim):
    assert all(pools.run(n, _cases.split_gather_grad, (5, 3, 7), dim))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_documented_gradient_recipes(pools, n):
    assert all(pools.run(n, _cases.grad_convention))


@pytest.mark.parametrize("n", [2, 3])
def test_split_shard_grad_mode(pools, n):
    assert all(pools.run(n, _cases.split_shard_mode_grad))
