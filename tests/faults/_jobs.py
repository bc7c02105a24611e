"""Per-rank bodies of the fault tests (module-level: RankPool workers import them)."""

from __future__ import annotations

from datetime import timedelta


def group_timeouts(dp: int, sp: int) -> dict:
    """Build the training mesh; the timeouts of the world group and of its dimensions, then
    of every group after :func:`dsp.mesh.set_group_timeouts` with 3 s."""
    from torch.distributed import distributed_c10d as c10d

    from dsp.mesh import group_timeout, set_group_timeouts
    from dsp.train.runtime import ParallelDims

    mesh = ParallelDims.resolve(("dp", "sp"), (dp, sp), dp * sp).mesh("cpu")
    got = {
        "world": group_timeout(),
        "dp": group_timeout(mesh["dp"].get_group()),
        "sp": group_timeout(mesh["sp"].get_group()),
    }
    set_group_timeouts(timedelta(seconds=3))
    got["all"] = [
        group_timeout(g) for g in list(c10d._world.pg_map) if not c10d._rank_not_in_group(g)
    ]
    set_group_timeouts()  # back to the job's (the pool is shared by nothing else)
    return got
