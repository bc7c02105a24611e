"""Property-based tests: random shapes, dims and world sizes (bounded examples)."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.comm import _cases


@st.composite
def switch_cases(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    src = draw(st.integers(0, ndim - 1))
    dst = draw(st.integers(0, ndim - 1).filter(lambda d: d != src))
    n = draw(st.sampled_from([1, 2, 3, 4]))
    pass_size = draw(st.booleans())
    return shape, src, dst, n, pass_size


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(switch_cases())
def test_switch_roundtrip_and_bytes(pools, case):
    shape, src, dst, n, pass_size = case
    out = pools.run(n, _cases.switch_placement, [shape], [(src, dst)], pass_size=pass_size)
    assert out == [1] * n


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(switch_cases())
def test_switch_gradient(pools, case):
    shape, src, dst, n, _ = case
    assert all(pools.run(n, _cases.switch_grad, shape, src, dst))
