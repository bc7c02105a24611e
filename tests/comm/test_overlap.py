"""dsp.comm.overlap: a switch launched, then waited for, forward and backward."""

from __future__ import annotations

import pytest

from tests.comm import _overlap


@pytest.mark.parametrize("n", [2, 3])
def test_a_switch_in_two_halves_equals_the_blocking_switch(pools, n):
    assert sum(pools.run(n, _overlap.two_halves)) > 0
