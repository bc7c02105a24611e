"""ring_shift: every rank's buffer moves to the next rank in one async all-to-all, recorded
and timed like a send/receive pair (ring attention's transfers)."""

import pytest
import torch

from tests.comm import _shift_cases


@pytest.mark.parametrize("n", [2, 3, 4])
def test_each_rank_receives_the_previous_ranks_buffer(pools, n):
    assert all(pools.run(n, _shift_cases.shift_once))
    assert all(pools.run(n, _shift_cases.shift_once, torch.bfloat16))
