"""dsp.attention.ring: N ranks equal one process (output and grads); bytes are analytic."""

import pytest
import torch

from dsp.attention import ring_bytes
from tests.attention import _ring_cases

# (world size, sequence lengths): even, uneven, and shorter than some shards (empty ones)
CASES = [(1, (8, 7)), (2, (8, 7)), (3, (9, 7, 2)), (4, (8, 7, 3))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("n,lengths", CASES, ids=[f"n{n}" for n, _ in CASES])
def test_matches_single_process_and_bytes(pools, n, lengths, dtype):
    for seq_len in lengths:
        assert all(pools.run(n, _ring_cases.matches_single_process, seq_len, dtype))


@pytest.mark.parametrize("n", [1, 3])
def test_default_sizes_and_ring_core(pools, n):
    assert all(pools.run(n, _ring_cases.default_sizes_and_core))


@pytest.mark.parametrize("n", [2, 3])
def test_attention_module_with_ring_core(pools, n):
    assert all(pools.run(n, _ring_cases.attention_module_with_ring_core, 5))


def test_bad_inputs_raise_on_every_rank(pools):
    assert all(pools.run(2, _ring_cases.bad_inputs))


def test_ring_bytes_formula():
    # N = 3, sizes (3, 3, 1), B H D = 2 3 4, fp32: rank 0 sends blocks 0 and 2 forward
    row = 2 * 2 * 3 * 4
    assert ring_bytes([3, 3, 1], 0, 2, 3, 4, 4) == {
        "forward": row * 4 * (3 + 1),
        "backward": row * 4 * (3 + 1) + row * 4 * 7,
    }
    # bf16 inputs: kv travel in bf16, dk/dv accumulators in fp32
    assert ring_bytes([2, 2], 1, 1, 1, 1, 2)["backward"] == 2 * 2 * 2 + 2 * 4 * 4
    assert ring_bytes([5], 0, 2, 3, 4, 8) == {"forward": 0, "backward": 0}
