"""dsp.comm.primitives.switch_many: several tensors in one all-to-all, equal to one switch
each (values, gradients, bytes), one message per peer instead of one per tensor."""

import pytest
import torch

from dsp.comm.primitives import switch_many
from tests.comm import _many_cases

# q, k, v like (B, L, H, D) with uneven L and H; a GQA-like k/v with fewer heads and an
# empty-shard case (H = 2 < N = 3)
QKV = [(2, 7, 5, 3)] * 3
GQA = [(2, 7, 5, 3), (2, 7, 2, 3), (2, 7, 2, 3)]
EVEN = [(2, 6, 6, 3)] * 3  # every block alike at N = 2, 3: the one-strided-copy path


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("src,dst", [(1, 2), (2, 1), (0, 3), (3, 1)])
def test_equals_one_switch_per_tensor(pools, n, src, dst):
    assert all(pools.run(n, _many_cases.switch_many_equals_switches, QKV, src, dst))
    assert all(pools.run(n, _many_cases.switch_many_equals_switches, GQA, 1, 2))
    assert all(pools.run(n, _many_cases.switch_many_equals_switches, EVEN, src, dst))


@pytest.mark.parametrize("n", [2, 3])
def test_sizes_learned_and_other_dtypes(pools, n):
    assert all(
        pools.run(n, _many_cases.switch_many_equals_switches, GQA, 2, 1, torch.bfloat16, False)
    )


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("src,dst", [(1, 2), (2, 1)])
def test_gradients_equal_and_backward_is_one_all_to_all(pools, n, src, dst):
    assert all(pools.run(n, _many_cases.switch_many_grad, GQA, src, dst))
    assert all(pools.run(n, _many_cases.switch_many_grad, EVEN, src, dst))


def test_mixed_dtypes_raise():
    with pytest.raises(ValueError, match="share dtype"):
        switch_many([torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)], 0, 1)
