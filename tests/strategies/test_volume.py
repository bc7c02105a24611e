"""Measured bytes equal docs/communication.md's formulas; the paper's headline holds."""

import pytest

from dsp.models import build_model
from dsp.strategies.volume import Shape, expected_bytes, per_layer_forward
from tests.strategies import _cases

STRATEGIES = ["dsp", "ulysses", "ring", "megatron_sp"]


def _expected(strategy, model_name, shape, n, **options):
    b, t, h, w = shape
    model = build_model(model_name)
    return [
        expected_bytes(
            strategy,
            model,
            batch=b,
            frames=t,
            patches=(h // 2) * (w // 2),
            world_size=n,
            rank=r,
            elem_size=8,
            **options,
        )
        for r in range(n)
    ]


@pytest.mark.parametrize("model", ["stdit-tiny", "latte-tiny"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n,shape", [(2, (2, 5, 6, 10)), (3, (1, 7, 6, 6)), (4, (2, 8, 8, 8))])
def test_measured_bytes_equal_formula(pools, model, strategy, n, shape):
    measured = pools.run(n, _cases.measure, model, strategy, shape)
    assert measured == _expected(strategy, model, shape, n)


@pytest.mark.parametrize("model", ["stdit-tiny", "latte-tiny"])
@pytest.mark.parametrize("n,u,shape", [(4, 2, (2, 5, 6, 10)), (3, 3, (1, 7, 6, 6))])
def test_usp_bytes_equal_formula(pools, model, n, u, shape):
    measured = pools.run(n, _cases.measure, model, "usp", shape, {"ulysses_degree": u})
    assert measured == _expected("usp", model, shape, n, ulysses_degree=u)


@pytest.mark.parametrize("n", [2, 4])
def test_headline_per_layer(pools, n):
    """One STDiT layer (depth 2 minus depth 1, measured): DSP sends half of fair Ulysses'
    forward bytes and 1/(4N) of Megatron-SP's (even sizes, heads divisible by N)."""
    shape = (1, 8, 8, 8)  # T = 8, S = 16
    per_layer = {}
    for s in ["dsp", "ulysses", "megatron_sp"]:
        one = pools.run(n, _cases.measure, "stdit-tiny", s, shape, depth=1)
        two = pools.run(n, _cases.measure, "stdit-tiny", s, shape, depth=2)
        per_layer[s] = [b["forward"] - a["forward"] for a, b in zip(one, two)]
        x = [Shape(1, 8, 16, 32, 4, n, r, 8) for r in range(n)]
        assert per_layer[s] == [per_layer_forward(s, xr) for xr in x]
    for r in range(n):
        assert per_layer["dsp"][r] * 2 == per_layer["ulysses"][r]
        assert per_layer["dsp"][r] * 4 * n == per_layer["megatron_sp"][r]
