"""torch.compile on a parallelized model: same results, same collectives on every call."""

from __future__ import annotations

import pytest

from tests.parallelize import _compile


@pytest.mark.parametrize("chunks", [1, 2])
def test_compiled_parallel_model_equals_eager(pools, chunks):
    results = pools.run(2, _compile.compiled_equals_eager, "aot_eager", chunks)
    assert all(r["graphs"] >= 1 for r in results)
