"""Shared fixtures: persistent gloo rank pools (one per world size) for distributed tests."""

from __future__ import annotations

import pytest
import torch

from dsp.launch import RankPool

torch.set_num_threads(1)


class Pools:
    """Lazily started :class:`RankPool` per world size, replaced when one breaks."""

    def __init__(self):
        self._pools: dict = {}

    def get(self, world_size: int) -> RankPool:
        pool = self._pools.get(world_size)
        if pool is None or pool.broken:
            if pool is not None:
                pool.close()
            pool = RankPool(world_size, timeout=60)
            self._pools[world_size] = pool
        return pool

    def run(self, world_size: int, fn, *args, **kwargs):
        return self.get(world_size).run(fn, *args, **kwargs)

    def close(self):
        for p in self._pools.values():
            p.close()


@pytest.fixture(scope="session")
def pools():
    p = Pools()
    yield p
    p.close()
