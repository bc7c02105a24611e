"""Run a function on N local processes joined in one process group (gloo on loopback).

Used by ``dsp demo``, benchmarks and the test suite. For real jobs use ``torchrun`` and
:func:`dsp.init_process_group`; this is the single-machine convenience.

:class:`RankPool` keeps its workers (and their process group) alive between calls, so many
small distributed runs cost one start-up. ``fn`` must be importable (a module-level function).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Optional

__all__ = ["RankError", "RankPool", "spawn", "free_port", "enter_netns"]


class RankError(RuntimeError):
    """One or more ranks raised; ``errors`` maps rank -> formatted traceback."""

    def __init__(self, errors: dict):
        self.errors = errors
        first = min(errors)
        super().__init__(
            f"{len(errors)} rank(s) failed ({sorted(errors)}); rank {first}:\n{errors[first]}"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: ``CLONE_NEWNET`` from <sched.h>: the namespace type passed to ``setns(2)``.
CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move the calling thread into the network namespace ``name`` (``setns(2)``).

    ``name`` is an ``ip netns`` name (``/run/netns/<name>``) or a path to a namespace file.
    Sockets created afterwards, and threads started afterwards, live in that namespace.
    Python 3.11 has no ``os.setns``, so this calls libc through ctypes. Needs root.
    """
    import ctypes
    import ctypes.util

    if os.sep in name:
        path = name
    else:
        base = "/run/netns" if os.path.isdir("/run/netns") else "/var/run/netns"
        path = os.path.join(base, name)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path!r}, CLONE_NEWNET) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def _environ(update: dict):
    saved = {k: os.environ.get(k) for k in update}
    os.environ.update(update)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker(
    rank,
    world_size,
    addr,
    port,
    backend,
    timeout_s,
    threads,
    path,
    env,
    inq,
    outq,
    netns=None,
):
    if netns is not None:
        # first, before torch starts any thread or socket: everything after is in the namespace
        enter_netns(netns)
    sys.path[:] = path
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    while True:
        job = inq.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            outq.put((rank, True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            msg = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            outq.put((rank, False, f"{type(e).__name__}: {e}\n{msg}"))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` worker processes in one process group, reused across :meth:`run` calls.

    Args:
        world_size: number of ranks.
        backend: ``"gloo"`` (CPU) or ``"nccl"``.
        timeout: process-group timeout in seconds; a collective that waits longer raises.
        threads: ``torch.set_num_threads`` per worker.
        addr: master address (rank 0 listens there). With ``netns``, rank 0's address in
            its namespace.
        env: extra environment variables for the workers.
        netns: optional per-rank network namespace names (or paths); each worker enters its
            namespace with ``setns`` before creating the process group, so its traffic goes
            over that namespace's interfaces (see :class:`dsp.bench.link.EmulatedLink`). The
            parent-worker queues are local pipes and work across namespaces.
        rank_env: optional per-rank extra environment, applied after ``env`` (e.g.
            ``GLOO_SOCKET_IFNAME`` = the rank's interface).
    """

    def __init__(
        self,
        world_size: int,
        *,
        backend: str = "gloo",
        timeout: float = 120.0,
        threads: int = 1,
        addr: str = "127.0.0.1",
        env: Optional[dict] = None,
        netns: Optional[List[str]] = None,
        rank_env: Optional[List[dict]] = None,
    ):
        if world_size < 1:
            raise ValueError(f"RankPool: world_size must be >= 1, got {world_size}")
        for what, per_rank in (("netns", netns), ("rank_env", rank_env)):
            if per_rank is not None and len(per_rank) != world_size:
                raise ValueError(
                    f"RankPool: {what} needs one entry per rank ({world_size}), got {len(per_rank)}"
                )
        self.world_size = world_size
        self.timeout = timeout
        self.broken = False
        ctx = mp.get_context("spawn")
        self._outq = ctx.Queue()
        self._inqs = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        envs = [
            {**(env or {}), **(rank_env[r] if rank_env is not None else {})}
            for r in range(world_size)
        ]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(
                    r,
                    world_size,
                    addr,
                    port,
                    backend,
                    timeout,
                    threads,
                    list(sys.path),
                    envs[r],
                    self._inqs[r],
                    self._outq,
                    netns[r] if netns is not None else None,
                ),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p, rank_environ in zip(self._procs, envs):
            # The child imports torch while unpickling its target, before _worker runs: put
            # its environment in place at spawn time too (e.g. TORCH_CPP_LOG_LEVEL), then
            # restore ours.
            with _environ(rank_environ):
                p.start()

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> List[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results in order.

        Raises:
            RankError: if any rank raised (every rank's error is in ``.errors``).
        """
        if self.broken:
            raise RuntimeError("RankPool: an earlier run left the pool broken; make a new one")
        for q in self._inqs:
            q.put((fn, args, kwargs))
        results: dict = {}
        errors: dict = {}
        deadline = time.monotonic() + self.timeout * 2 + 60
        while len(results) + len(errors) < self.world_size:
            try:
                rank, ok, value = self._outq.get(timeout=1.0)
            except queue.Empty:
                dead = {
                    r: f"process died with exit code {p.exitcode}"
                    for r, p in enumerate(self._procs)
                    if p.exitcode is not None
                }
                if dead or time.monotonic() > deadline:
                    self.broken = True
                    missing = set(range(self.world_size)) - set(results) - set(errors)
                    late = {r: "no answer within the timeout (hung)" for r in missing}
                    raise RankError({**late, **dead, **errors}) from None
                continue
            (results if ok else errors)[rank] = value
        if errors:
            # Every rank raised: they are still in step and the pool stays usable. Some ranks
            # raised while others returned: their collectives may be out of step, so retire it.
            self.broken = len(errors) < self.world_size
            raise RankError(errors)
        return [results[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q, p in zip(self._inqs, self._procs):
            if p.is_alive():
                try:
                    q.put(None)
                except (OSError, ValueError):
                    pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spawn(fn: Callable, world_size: int, *args: Any, **kwargs: Any) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` once on ``world_size`` fresh gloo ranks; per-rank results."""
    with RankPool(world_size) as pool:
        return pool.run(fn, *args, **kwargs)
