"""Generator seeds derived from ``(seed, purpose, index)``: per-sample randomness that does
not depend on which rank, batch or process draws it."""

from __future__ import annotations

import numpy as np

__all__ = ["PURPOSES", "sample_seed"]

PURPOSES = {"video": 0, "noise": 1, "time": 2, "drop": 3, "sample": 4}


def sample_seed(seed: int, purpose: str, index: int) -> int:
    """A 63-bit generator seed for ``(seed, purpose, index)`` (numpy ``SeedSequence``)."""
    state = np.random.SeedSequence([int(seed), PURPOSES[purpose], int(index)]).generate_state(
        2, np.uint32
    )
    return (int(state[0]) << 31) ^ int(state[1])
