"""Saved-activation bytes per rank: DSP's are about 1/N of one process's."""

import pytest

from tests.strategies import _cases

SHAPE = (1, 16, 16, 16)  # T = 16, S = 64


@pytest.mark.parametrize("n", [2, 4])
def test_dsp_saved_activations_scale_as_one_over_n(pools, n):
    single = pools.run(1, _cases.saved_bytes, "stdit-tiny", "single", SHAPE)[0]
    per_rank = pools.run(n, _cases.saved_bytes, "stdit-tiny", "dsp", SHAPE)
    for b in per_rank:
        assert single / n <= b <= 1.1 * single / n, (b, single / n)
    # no baseline saves less than DSP
    for s in ["ulysses", "ring", "megatron_sp"]:
        assert min(pools.run(n, _cases.saved_bytes, "stdit-tiny", s, SHAPE)) >= max(per_rank)


def test_saved_activations_skip_parameters():
    import torch

    from dsp.memory import saved_activations

    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    with saved_activations(lin.parameters()) as saved:
        y = lin(x).sin()
    assert saved.bytes == 2 * 3 * 4 * 4  # x for the weight grad, lin(x) for sin's backward
    y.sum().backward()
