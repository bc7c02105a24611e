"""Communication: the resharding primitives and the one accounting layer they go through."""

from dsp.comm.log import CommLog, CommRecord, comm_log
from dsp.comm.primitives import gather, split, switch
from dsp.comm.shards import local_shard, shard_offsets, shard_sizes

__all__ = [
    "CommLog",
    "CommRecord",
    "comm_log",
    "gather",
    "local_shard",
    "shard_offsets",
    "shard_sizes",
    "split",
    "switch",
]
