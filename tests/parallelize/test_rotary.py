"""Rotary tables as a tuple companion and attention called with keyword q, k, v (Wan's way)."""

import pytest

from tests.parallelize import _rotary


@pytest.mark.parametrize("kind", ["heads", "ring"])
def test_tuple_companions_and_keyword_attention_equal_one_process(pools, kind):
    results = pools.run(3, _rotary.equality, kind)
    assert sum(r["sent"] for r in results) == results[0]["predicted"] > 0
    assert kind in results[0]["kinds"]
