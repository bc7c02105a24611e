"""dsp.switch: placement, bytes, round trips and gradients against a single process."""

import itertools

import pytest

from tests.comm import _cases

SHAPES_5D = [(2, 4, 6, 8, 4), (3, 5, 7, 2, 3)]  # even-ish and uneven lengths


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_ordered_pair_of_5d(pools, n):
    checked = pools.run(n, _cases.switch_placement, SHAPES_5D)
    assert checked == [2 * 20] * n


@pytest.mark.parametrize("n", [2, 3])
def test_ranks_2d_to_6d(pools, n):
    shapes = [(5, 7), (4, 3, 5), (2, 5, 3, 7), (3, 2, 4, 3, 5), (2, 3, 2, 5, 2, 3)]
    pairs = [(0, 1), (1, 0)]
    assert all(pools.run(n, _cases.switch_placement, shapes, pairs))


def test_world_size_8_uneven_and_empty_shards(pools):
    # dims shorter than the world size give empty shards: supported, not padded
    shapes = [(2, 9, 5, 3), (1, 3, 17, 2)]
    assert all(pools.run(8, _cases.switch_placement, shapes, [(1, 2), (2, 1), (0, 3)]))


@pytest.mark.parametrize("n", [2, 3])
def test_empty_shards(pools, n):
    assert all(pools.run(n, _cases.switch_placement, [(1, 2, 5)], None))


@pytest.mark.parametrize("n", [3, 4])
def test_src_size_learned_by_metadata_exchange(pools, n):
    assert all(pools.run(n, _cases.switch_placement, [(3, 5, 7)], None, pass_size=False))


@pytest.mark.parametrize("n", [1, 3])
def test_negative_dims_and_noncontiguous(pools, n):
    assert all(pools.run(n, _cases.switch_negative_and_noncontig))


@pytest.mark.parametrize("n", [2, 3])
def test_dtypes(pools, n):
    assert all(pools.run(n, _cases.switch_dtypes))


def test_subgroups(pools):
    assert all(pools.run(4, _cases.subgroup_switch))


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("src,dst", list(itertools.permutations(range(4), 2))[::3])
def test_gradient_is_the_adjoint(pools, n, src, dst):
    assert all(pools.run(n, _cases.switch_grad, (3, 5, 4, 7), src, dst))
