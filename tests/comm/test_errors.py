"""Bad input raises a clear error on every rank, and nothing hangs."""

import pytest
import torch

import dsp
from dsp.launch import RankError, RankPool
from tests.comm import _cases


def test_no_process_group():
    with pytest.raises(RuntimeError, match="not initialised"):
        dsp.switch(torch.zeros(2, 2), 0, 1)
    with pytest.raises(RuntimeError, match="not initialised"):
        dsp.local_shard(torch.zeros(2, 2), 0)


@pytest.mark.parametrize("n", [1, 3])
def test_bad_dims_raise_on_every_rank(pools, n):
    assert all(pools.run(n, _cases.bad_dims))


@pytest.mark.parametrize("n", [2, 3])
def test_shape_mismatch_is_caught_by_validation_on_every_rank(pools, n):
    msgs = pools.run(n, _cases.shape_mismatch_validated)
    assert len(set(msgs)) == 1  # the same message on every rank


def test_non_member_group(pools):
    assert all(pools.run(3, _cases.non_member_group))


def test_wrong_shard_without_validation_times_out_instead_of_hanging():
    with RankPool(2, timeout=3) as pool:
        with pytest.raises(RankError) as info:
            pool.run(_cases.wrong_local_size_without_validation)
    errors = info.value.errors
    assert "rank 0 holds 5 elements of dim 0" in errors[0]
    # rank 1 entered the all-to-all alone and the group's timeout ended it
    assert "Timed out" in errors[1], errors
