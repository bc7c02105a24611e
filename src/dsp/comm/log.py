"""The accounting layer: every collective the library issues is recorded here.

Only :mod:`dsp.comm.collectives` calls :func:`record`; every other module communicates
through those wrappers (a test scans the package to keep it that way), so a
``comm_log()`` block sees every byte the library sends.

Conventions (per rank, in bytes):

* ``bytes_sent``: payload this rank hands to *other* ranks; what it keeps is not counted.
* ``bytes_recv``: payload this rank receives from other ranks.
* ``meta``: small exchanges that only learn sizes or validate shapes. They are recorded
  but excluded from :attr:`CommLog.bytes_sent` (see :attr:`CommLog.meta_bytes_sent`).
* ``wait_s``: wall seconds this rank spent blocked inside communication calls (a blocking
  collective, or the ``wait()`` of a posted send/receive), i.e. communication that no
  compute hid. On CPU (gloo) a call returns when its data has moved; on CUDA (NCCL) calls
  return once queued, so there it counts only what blocks the host.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator, List

import torch

__all__ = ["CommRecord", "CommLog", "comm_log", "record", "current_phase", "timed"]


@dataclass(frozen=True)
class CommRecord:
    """One collective as seen by this rank."""

    op: str
    group_size: int
    bytes_sent: int
    bytes_recv: int
    phase: str  # "forward" or "backward"
    meta: bool = False
    tag: str = ""


@dataclass(eq=False)  # identity semantics: open blocks are removed by identity
class CommLog:
    """Records collected inside a :func:`comm_log` block."""

    records: List[CommRecord] = field(default_factory=list)
    wait_s: float = 0.0  # seconds blocked inside communication calls (exposed communication)

    def _payload(self, phase: str | None = None) -> List[CommRecord]:
        return [r for r in self.records if not r.meta and (phase is None or r.phase == phase)]

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this rank sent to other ranks (metadata excluded)."""
        return sum(r.bytes_sent for r in self._payload())

    @property
    def bytes_recv(self) -> int:
        return sum(r.bytes_recv for r in self._payload())

    @property
    def meta_bytes_sent(self) -> int:
        return sum(r.bytes_sent for r in self.records if r.meta)

    def sent(self, phase: str | None = None, op: str | None = None) -> int:
        """Payload bytes sent, optionally restricted to a phase and/or an op name."""
        return sum(r.bytes_sent for r in self._payload(phase) if op is None or r.op == op)

    def count(self, op: str | None = None, phase: str | None = None) -> int:
        """Number of payload collectives, optionally of one op and/or phase."""
        return sum(1 for r in self._payload(phase) if op is None or r.op == op)

    def by_op(self) -> dict:
        """``{(op, phase): bytes_sent}`` over payload records."""
        out: dict = {}
        for r in self._payload():
            out[(r.op, r.phase)] = out.get((r.op, r.phase), 0) + r.bytes_sent
        return out

    def clear(self) -> None:
        self.records.clear()
        self.wait_s = 0.0


_active: List[CommLog] = []


@contextlib.contextmanager
def comm_log() -> Iterator[CommLog]:
    """Collect a :class:`CommLog` of every library collective issued inside the block.

    Blocks nest; a collective is recorded in every open block.

    Example:
        >>> with dsp.comm_log() as log:
        ...     y = dsp.switch(x, 1, 2, src_size=T)
        >>> log.bytes_sent
    """
    log = CommLog()
    _active.append(log)
    try:
        yield log
    finally:
        _active.remove(log)


def current_phase() -> str:
    """``"backward"`` while the autograd engine runs a backward pass, else ``"forward"``."""
    return "backward" if torch._C._current_graph_task_id() != -1 else "forward"


def record(
    op: str,
    group_size: int,
    bytes_sent: int,
    bytes_recv: int,
    *,
    meta: bool = False,
    tag: str = "",
) -> None:
    """Append one record to every open log. Called only by :mod:`dsp.comm.collectives`."""
    if not _active:
        return
    rec = CommRecord(op, group_size, int(bytes_sent), int(bytes_recv), current_phase(), meta, tag)
    for log in _active:
        log.records.append(rec)


@contextlib.contextmanager
def timed() -> Iterator[None]:
    """Add the wall time of the block to ``wait_s`` of every open log.

    Wraps every blocking communication call in :mod:`dsp.comm.collectives`; costs one
    ``perf_counter`` pair, and nothing when no log is open.
    """
    if not _active:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        dt = time.perf_counter() - t0
        for log in _active:
            log.wait_s += dt
