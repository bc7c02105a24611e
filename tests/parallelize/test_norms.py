"""Sharded group norms (dsp.parallelize.norms): exact statistics, counted bytes."""

from __future__ import annotations

import pytest

from tests.parallelize import _norms


@pytest.mark.parametrize("n", [2, 3])
def test_group_norm_over_a_sharded_dim_equals_one_process(pools, n):
    results = pools.run(n, _norms.group_norm_on_row_shards)
    assert sum(r["forward"] for r in results) == results[0]["f"] > 0
    assert sum(r["backward"] for r in results) == results[0]["b"] > 0


def test_group_norm_sharded_on_an_odd_dim_with_one_row_per_rank(pools):
    pools.run(3, _norms.group_norm_on_row_shards, (1, 4, 3, 3, 2), 2, 2)
