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


@pytest.mark.parametrize("n", [2, 3])
def test_a_module_that_needs_every_frame_runs_on_its_own_rows(pools, n):
    results = pools.run(n, _norms.small_unet)
    assert sum(r["sent"] for r in results) == results[0]["predicted"] > 0
    ((kind, module, shard),) = results[0]["stages"]
    assert (kind, module) == ("compute", "motion") and shard in ("Hm", "Wm")


def test_own_dims_and_norms_are_checked_before_any_collective():
    import torch

    import dsp.parallelize as P

    model, x = _norms.Net().double(), torch.randn(2, 5, 3, 7, 3, dtype=torch.float64)
    bad = {**_norms.DECLARE, "motion": {**_norms.DECLARE["motion"], "shard": "Zm"}}
    with pytest.raises(P.PlanError, match=r"may run sharded on \['Zm'\].*no declared input"):
        P.record(model, (x,), streams=_norms.STREAMS, declare=bad)
    no_norm = {k: dict(v) for k, v in _norms.DECLARE.items()}
    del no_norm["motion"]["norm"]
    rec = P.record(model, (x,), streams=_norms.STREAMS, declare=no_norm)
    with pytest.raises(P.PlanError, match="group_norm call.*declare their input layout"):
        rec.plan(2)
