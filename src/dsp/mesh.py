"""Process groups: creation with timeouts, and resolution of the ``group`` argument.

Every communicating function in dsp takes its group explicitly (``None`` means the default
world group). Groups created here carry a timeout, so a dead or diverging peer ends the job
with an error instead of a hang.

One timeout for a whole job: ``DSP_TIMEOUT`` (seconds), when set, is the timeout of every
group and local rank pool dsp creates, in this process and the processes it starts (the
``--timeout`` flag of the ``dsp`` commands sets it). Torch creates some groups itself
(:class:`~torch.distributed.device_mesh.DeviceMesh` dimensions, which otherwise get gloo's
30-minute default); :func:`set_group_timeouts` gives every existing group the job's timeout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence

import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT",
    "default_timeout",
    "group_timeout",
    "set_group_timeouts",
    "GroupInfo",
    "group_info",
    "init_process_group",
    "new_group",
]

#: Default timeout of the groups dsp creates (without ``DSP_TIMEOUT``). Collectives that wait
#: longer raise.
DEFAULT_TIMEOUT = timedelta(minutes=5)
#: The environment variable that sets one timeout (seconds) for a whole job.
TIMEOUT_ENV = "DSP_TIMEOUT"


def parse_timeout(value, what: str = TIMEOUT_ENV) -> float:
    """``value`` (seconds, str or number) as a float > 0; a one-line ``ValueError`` otherwise."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}") from None
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
    return seconds


def default_timeout(fallback: timedelta = DEFAULT_TIMEOUT) -> timedelta:
    """The job's timeout: ``DSP_TIMEOUT`` seconds when set, else ``fallback``."""
    value = os.environ.get(TIMEOUT_ENV)
    if value is None or value == "":
        return fallback
    return timedelta(seconds=parse_timeout(value))


def _backends(group):
    import torch

    for device in ("cpu", "cuda"):
        try:
            yield group._get_backend(torch.device(device))
        except RuntimeError:  # no backend for that device type in this group
            continue


def group_timeout(group: Optional[dist.ProcessGroup] = None) -> timedelta:
    """The timeout of ``group``'s first backend (``None``: the world group)."""
    group = group or dist.distributed_c10d._get_default_group()
    for backend in _backends(group):
        return backend.options._timeout
    raise RuntimeError("dsp: the group has no backend")


def set_group_timeouts(timeout: Optional[timedelta] = None) -> int:
    """Give every process group of this process (the world, subgroups, DeviceMesh dimensions,
    groups torch made for DDP/FSDP) the same ``timeout`` (default: :func:`default_timeout`).

    Torch creates the groups of a :class:`~torch.distributed.device_mesh.DeviceMesh` without
    a timeout, so gloo's 30-minute default applies to them unless set here. Returns how many
    groups were set. A no-op without torch.distributed.
    """
    if not dist.is_available() or not dist.is_initialized():
        return 0
    from torch.distributed import distributed_c10d as c10d

    timeout = timeout if timeout is not None else default_timeout()
    count = 0
    for group in list(c10d._world.pg_map):
        if c10d._rank_not_in_group(group):
            continue
        for backend in _backends(group):
            backend._set_default_timeout(timeout)
        count += 1
    return count


@dataclass(frozen=True)
class GroupInfo:
    """A resolved group: the handle, this rank's index in it and its size."""

    group: Optional[dist.ProcessGroup]
    rank: int
    size: int


def group_info(group: Optional[dist.ProcessGroup] = None) -> GroupInfo:
    """Resolve ``group`` (``None``: the world) and check that this rank belongs to it.

    Raises:
        RuntimeError: torch.distributed is not initialised, or this rank is not a member.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "dsp: torch.distributed is not initialised; call dsp.init_process_group() "
            "(or torch.distributed.init_process_group) before using split/switch/gather"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(
            f"dsp: global rank {dist.get_rank()} is not a member of the given process group; "
            "pass a group that contains this rank"
        )
    return GroupInfo(group, rank, dist.get_world_size(group))


def init_process_group(
    backend: Optional[str] = None,
    *,
    timeout: Optional[timedelta] = None,
    **kwargs,
) -> None:
    """Initialise the default group (env:// rendezvous, as torchrun sets it) with a timeout
    (default :func:`default_timeout`).

    ``backend`` defaults to ``nccl`` when CUDA is available and ``LOCAL_RANK`` is set, else
    ``gloo``. Extra keyword arguments go to :func:`torch.distributed.init_process_group`.
    """
    if dist.is_initialized():
        return
    if backend is None:
        import torch

        use_nccl = torch.cuda.is_available() and "LOCAL_RANK" in os.environ
        backend = "nccl" if use_nccl else "gloo"
    timeout = timeout if timeout is not None else default_timeout()
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)


def new_group(
    ranks: Optional[Sequence[int]] = None,
    *,
    timeout: Optional[timedelta] = None,
    backend: Optional[str] = None,
) -> Optional[dist.ProcessGroup]:
    """Create a sub-group with a timeout (default :func:`default_timeout`; all ranks must call
    it, as in torch)."""
    return dist.new_group(
        ranks=list(ranks) if ranks is not None else None,
        timeout=timeout if timeout is not None else default_timeout(),
        backend=backend,
    )


def group_ranks(group: Optional[dist.ProcessGroup] = None) -> list:
    """Global ranks of ``group`` in group-rank order."""
    if group is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def split_group(
    group: Optional[dist.ProcessGroup], inner: int, *, timeout: Optional[timedelta] = None
) -> tuple:
    """Split ``group`` (size ``outer * inner``) into a 2-D grid; return this rank's groups.

    Group rank ``i`` sits at ``(i // inner, i % inner)``. Returns ``(inner_group,
    outer_group)``: the ``inner`` consecutive ranks sharing ``i // inner``, and the ``outer``
    ranks sharing ``i % inner``. Every rank of ``group`` must call this (it creates all
    sub-groups, in the same order everywhere).
    """
    ranks = group_ranks(group)
    n = len(ranks)
    if inner < 1 or n % inner:
        raise ValueError(f"dsp: cannot split a group of {n} ranks into rows of {inner}")
    me = dist.get_rank()
    mine_inner = mine_outer = None
    for row in range(n // inner):
        members = ranks[row * inner : (row + 1) * inner]
        g = new_group(members, timeout=timeout)
        if me in members:
            mine_inner = g
    for col in range(inner):
        members = ranks[col::inner]
        g = new_group(members, timeout=timeout)
        if me in members:
            mine_outer = g
    return mine_inner, mine_outer
