"""dsp: Dynamic Sequence Parallelism for multi-dimensional transformers.

Public API (a contract):

* :func:`split`, :func:`switch`, :func:`gather`: the resharding primitives (autograd-aware).
* :func:`shard_sizes`, :func:`local_shard`: the ``torch.tensor_split`` sharding convention.
* :func:`comm_log`: exact per-rank byte accounting of every library collective.
* :func:`init_process_group`, :func:`new_group`: groups with timeouts.
* ``dsp.parallelize(model, plan, group)``: DSP on any model from outside, with plans the
  planner in :mod:`dsp.parallelize` chooses (``dsp.parallelize.plan_model``).
"""

from dsp import parallelize  # noqa: E402  (a callable module: dsp.parallelize(model, plan))
from dsp.comm import (
    CommLog,
    CommRecord,
    comm_log,
    gather,
    local_shard,
    shard_offsets,
    shard_sizes,
    split,
    switch,
)
from dsp.mesh import DEFAULT_TIMEOUT, init_process_group, new_group

__version__ = "0.1.0"

__all__ = [
    "CommLog",
    "CommRecord",
    "DEFAULT_TIMEOUT",
    "comm_log",
    "gather",
    "init_process_group",
    "local_shard",
    "new_group",
    "parallelize",
    "shard_offsets",
    "shard_sizes",
    "split",
    "switch",
]
