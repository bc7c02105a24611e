"""shard_sizes and local_shard follow torch.tensor_split exactly."""

import pytest
import torch

import dsp


@pytest.mark.parametrize("length", [0, 1, 3, 7, 8, 10, 17])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_shard_sizes_match_tensor_split(length, n):
    want = [len(c) for c in torch.tensor_split(torch.arange(length), n)]
    assert dsp.shard_sizes(length, n) == want
    offs = dsp.shard_offsets(length, n)
    assert offs[0] == 0 and offs[-1] == length and len(offs) == n + 1


def test_shard_sizes_rejects_bad_input():
    with pytest.raises(ValueError, match="world_size"):
        dsp.shard_sizes(4, 0)
    with pytest.raises(ValueError, match="length"):
        dsp.shard_sizes(-1, 2)
