"""Ulysses' option to move q, k, v in one all-to-all (qkv_one_all_to_all): the same
outputs and gradients (bit for bit) and bytes as DeepSpeed's three all-to-alls, and per
attention 2 all-to-alls instead of 4 in forward and in backward."""

import pytest

from dsp.strategies import get_strategy
from tests.strategies import _qkv_cases


@pytest.mark.parametrize(
    "n,shape,overrides",
    [
        (2, (1, 5, 6, 6), {"hidden_size": 24, "num_heads": 3}),  # 3 heads over 2, T = 5
        (3, (2, 4, 6, 4), {}),  # 4 heads over 3, T = 4
    ],
)
@pytest.mark.parametrize("model", ["stdit-tiny", "latte-tiny"])
def test_ulysses_qkv_in_one_all_to_all_equals_three(pools, model, n, shape, overrides):
    for counts in pools.run(
        n, _qkv_cases.qkv_fused_equals_default, model, "ulysses", shape, overrides
    ):
        for phase, (three, one) in counts.items():
            # per attention: q, k, v, out (4) -> qkv, out (2); both directions
            assert three > one > 0 and three - one == one, (phase, three, one)


def test_usp_rows_move_qkv_in_one_all_to_all(pools):
    counts = pools.run(
        4,
        _qkv_cases.qkv_fused_equals_default,
        "stdit-tiny",
        "usp",
        (1, 4, 4, 4),
        {},
        {"ulysses_degree": 2},
    )
    for c in counts:
        assert all(three > one for three, one in c.values())


def test_only_ulysses_and_usp_take_the_option():
    with pytest.raises(ValueError, match="qkv_one_all_to_all applies to ulysses and usp"):
        get_strategy("dsp", qkv_one_all_to_all=True)
