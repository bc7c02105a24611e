"""Where a job runs: process group, device, mesh axes.

One code path for three launchers:

* **torchrun** (one or many nodes): ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are set; the
  default group is created with :func:`dsp.init_process_group` (NCCL when CUDA is available,
  gloo otherwise) and each process takes ``cuda:LOCAL_RANK``;
* **a local rank pool** (``dsp train --world-size N``, tests): the group already exists;
* **one process**: no process group at all; every collective is skipped.

:class:`ParallelDims` validates the degrees (their product must be the world size, with the
numbers in the error) and builds the named :class:`~torch.distributed.device_mesh.DeviceMesh`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

import dsp

__all__ = [
    "Runtime",
    "ParallelDims",
    "init_runtime",
    "autocast_dtype",
    "barrier",
    "barrier_or_raise",
]


@dataclass(frozen=True)
class Runtime:
    """This process: global rank, world size, local rank, device, whether a group exists."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _torchrun_env() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_runtime(*, device: str = "auto", timeout=None) -> Runtime:
    """Join (or create) the default process group and pick this process's device.

    Args:
        timeout: a ``timedelta`` for the group torchrun's environment creates here (default
            :func:`dsp.mesh.default_timeout`: ``DSP_TIMEOUT`` or 5 minutes).
        device: ``"auto"`` (``cuda:LOCAL_RANK`` when the group's backend is NCCL or, without a
            group, when CUDA is available; else CPU), ``"cpu"`` or ``"cuda"``.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available on this machine")
    if not dist.is_initialized() and _torchrun_env() and int(os.environ["WORLD_SIZE"]) > 1:
        if want_cuda:
            torch.cuda.set_device(local_rank)  # before NCCL creates its communicators
        dsp.init_process_group(backend="nccl" if want_cuda else "gloo", timeout=timeout)
    if dist.is_initialized():
        backend = dist.get_backend()
        use_cuda = "nccl" in backend
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, dev, True)
    dev = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    return Runtime(0, 1, local_rank, dev, False)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` (``auto``, ``fp32``, ``bf16``) on ``device``.

    ``auto`` is bf16 on a CUDA device that supports it and fp32 (no autocast) elsewhere; on
    CPU bf16 autocast works but is slower than fp32 on most cores, so it is opt-in.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")


def barrier(device: torch.device, group: Optional[dist.ProcessGroup] = None) -> None:
    """Wait for every rank of ``group`` (a one-element all-reduce, counted by dsp.comm_log)."""
    if dist.is_initialized():
        from dsp.comm import collectives as C

        C.all_reduce(torch.zeros(1, device=device), group, tag="barrier")


def barrier_or_raise(
    device: torch.device,
    error: Optional[BaseException],
    what: str,
    group: Optional[dist.ProcessGroup] = None,
) -> None:
    """A barrier that also agrees on failure: if any rank passes an ``error``, every rank
    raises (that rank its own error, the others a ``RuntimeError`` naming ``what``), so a
    failure on one rank never leaves the others waiting for the group's timeout."""
    failed = 1.0 if error is not None else 0.0
    if dist.is_initialized():
        from dsp.comm import collectives as C

        flag = torch.full((1,), failed, device=device)
        failed = C.all_reduce(flag, group, tag="barrier").item()
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{what} failed on another rank; see that rank's error")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of named mesh axes whose product is the world size (``("dp", "sp")``).

    Raises:
        ValueError: a degree < 1, or a product that is not the world size (with the numbers).
    """

    degrees: Tuple[int, ...]
    names: Tuple[str, ...]
    world_size: int

    def __post_init__(self):
        if len(self.degrees) != len(self.names):
            raise ValueError(f"{len(self.degrees)} degrees for axes {self.names}")
        for n, d in zip(self.names, self.degrees):
            if d < 1:
                raise ValueError(f"--{n} must be >= 1, got {d}")
        prod = 1
        for d in self.degrees:
            prod *= d
        if prod != self.world_size:
            desc = " x ".join(f"{n}={d}" for n, d in zip(self.names, self.degrees))
            raise ValueError(
                f"{desc} = {prod} ranks, but the world size is {self.world_size}; the product of "
                f"{', '.join('--' + n for n in self.names)} must equal the number of processes"
            )

    @classmethod
    def resolve(
        cls, names: Sequence[str], degrees: Sequence[Optional[int]], world_size: int
    ) -> ParallelDims:
        """Fill at most one missing degree (``None``) so that the product is the world size."""
        names, degrees = tuple(names), list(degrees)
        for n, d in zip(names, degrees):  # the flag's own error before any product of them
            if d is not None and d < 1:
                raise ValueError(f"--{n} must be >= 1, got {d}")
        missing = [i for i, d in enumerate(degrees) if d is None]
        if len(missing) > 1:
            raise ValueError(f"give all but one of {', '.join('--' + n for n in names)}")
        if missing:
            known = 1
            for d in degrees:
                known *= d or 1
            if known < 1 or world_size % known:
                raise ValueError(
                    f"the world size {world_size} is not divisible by "
                    + " x ".join(f"{n}={d}" for n, d in zip(names, degrees) if d is not None)
                    + f" = {known}"
                )
            degrees[missing[0]] = world_size // known
        return cls(tuple(degrees), names, world_size)

    def __getitem__(self, name: str) -> int:
        return self.degrees[self.names.index(name)]

    def mesh(self, device_type: str, timeout=None):
        """The :class:`DeviceMesh` with these axes (requires an initialised group).

        Every dimension's group gets ``timeout`` (default: the job's, ``DSP_TIMEOUT``): torch
        creates them without one, i.e. with gloo's 30-minute default.
        """
        from torch.distributed.device_mesh import init_device_mesh

        from dsp.mesh import set_group_timeouts

        mesh = init_device_mesh(device_type, self.degrees, mesh_dim_names=self.names)
        set_group_timeouts(timeout)
        return mesh
