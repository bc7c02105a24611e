"""Overlapped switches: compute stages in k slices (Stage.chunks), exact and counted."""

from __future__ import annotations

import pytest

from tests.parallelize import _cases

#: Sizes with dims long enough for slices of N rows: T = 7, S = 3 x 5 (stdit, latte),
#: T = 7, H = 5, W = 7 (axial); uneven over 2 and 3 ranks and over the slices.
LONG = {"stdit-tiny": (7, 6, 10), "latte-tiny": (7, 6, 10), "axial-tiny": (7, 10, 14)}


def _check(results, k):
    chunked = [st for st in results[0]["plan"]["stages"] if st.get("chunks")]
    assert chunked and all(2 <= st["chunks"] <= k for st in chunked), results[0]["plan"]
    assert sum(r["forward"] for r in results) == results[0]["predicted_forward"]
    assert sum(r["backward"] for r in results) == results[0]["predicted_backward"]


@pytest.mark.parametrize("n,k", [(2, 3), (3, 2)])
@pytest.mark.parametrize("name", sorted(LONG))
def test_chunked_stages_equal_one_process_and_their_dry_run(pools, name, n, k):
    _check(pools.run(n, _cases.equality, name, f"chunks:{k}", 1e-9, LONG[name]), k)


def test_stages_with_operands_or_other_streams_stay_blocking(pools):
    results = pools.run(2, _cases.equality, "evoformer-tiny", "chunks:2")
    assert results[0]["plan"] == pools.run(2, _cases.equality, "evoformer-tiny")[0]["plan"]


@pytest.mark.parametrize("early_stop", [True, False])
def test_chunked_stages_under_activation_checkpointing(pools, early_stop):
    """The recompute of a checkpointed block re-runs its sliced stage; with early stop it
    ends as soon as the saved tensors are back, so it must not leave transfers in flight."""
    left = pools.run(2, _cases.checkpointed_chunks, "stdit-tiny", LONG["stdit-tiny"], early_stop)
    assert left == [0, 0]
