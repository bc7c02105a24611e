"""Run a function on N local processes joined in one process group (gloo on loopback).

Used by ``dsp demo``, benchmarks and the test suite. For real jobs use ``torchrun`` and
:func:`dsp.init_process_group`; this is the single-machine convenience.

:class:`RankPool` keeps its workers (and their process group) alive between calls, so many
small distributed runs cost one start-up. ``fn`` must be importable (a module-level function).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Optional

from dsp.rank_error import RankError, first_line, split_causes

__all__ = ["RankError", "RankPool", "spawn", "free_port", "enter_netns"]


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
    conn,
    netns,
    stamps,
    owner,
):
    # (the bootstrap set the parent-death signal and started the heartbeat on ``stamps``)
    # Ctrl-C in a terminal reaches every process of the foreground group: the launcher alone
    # handles it (and ends the ranks), so a rank never dies half-way through a reply
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if netns is not None:
        # before torch starts any thread or socket: everything after is in the namespace
        enter_netns(netns)
    sys.path[:] = path
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{addr}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except Exception as e:  # noqa: BLE001 - the answer to the first job: an error, not a death
        conn.send((False, f"{type(e).__name__}: joining the process group: {e}"))
        sys.exit(1)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the launcher is gone
            break
        if job is None:
            break
        fn, args, kwargs = job
        try:
            conn.send((True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            msg = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            conn.send((False, f"{type(e).__name__}: {e}\n{msg}"))
    dist.destroy_process_group()


#: The first thing a rank runs (``exec`` in the spawned process): ``PR_SET_PDEATHSIG`` =
#: SIGKILL, exit if the launcher (the last argument) is already gone, start the heartbeat
#: thread, then import dsp (and torch: seconds) and serve. A launcher killed during the
#: imports takes its ranks with it, and a rank stopped during them stops beating.
_BOOTSTRAP = """
import ctypes, ctypes.util, os, signal
try:
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").prctl(1, signal.SIGKILL, 0, 0, 0)
except (OSError, AttributeError):
    pass
if os.getppid() != _args[-1]:
    os._exit(1)
import threading, time
def _beat(stamps=_args[-2], rank=_args[0]):  # dsp.watchdog.Heartbeats, before the imports
    while True:
        stamps[rank] = time.monotonic()
        time.sleep(0.5)
threading.Thread(target=_beat, name="dsp-heartbeat", daemon=True).start()
from dsp.launch import _worker
_worker(*_args)
"""

#: Seconds the launcher waits for the other ranks' errors after a rank died or hung.
GRACE_AFTER_DEATH = 2.0
#: At most this many seconds after the first error (and at least the timeout + 5 s, so that
#: ranks blocked in a collective report their own timeout): then the rest are ended.
GRACE_AFTER_ERROR = 30.0


class RankPool:
    """``world_size`` worker processes in one process group, reused across :meth:`run` calls.

    Args:
        world_size: number of ranks.
        backend: ``"gloo"`` (CPU) or ``"nccl"``.
        timeout: process-group timeout in seconds; a collective that waits longer raises, and a
            rank without a heartbeat for that long counts as hung. ``DSP_TIMEOUT``, when set,
            replaces it (one timeout for the whole job). Default 120 s.
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

    Failures (see docs/reliability.md): a rank that dies is reported first as ``rank R (pid
    P) died: SIGKILL``; a rank whose heartbeat stops for ``timeout`` seconds (stopped, wedged)
    as ``rank R (pid P) stopped answering``; the other ranks' errors that follow from it are
    folded under it; the remaining ranks are killed and the pool is retired (``broken``).
    A run that fails never waits longer than ``timeout + 30`` seconds after the failure.
    Ranks die with the launcher (``PR_SET_PDEATHSIG``; the kernel ties it to the creating
    *thread*, so create a pool in a thread that outlives it, e.g. the main thread), and every
    new pool first kills ranks whose launcher is gone (:func:`dsp.watchdog.sweep_orphans`).
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
        from dsp.mesh import default_timeout
        from dsp.watchdog import OWNER_ENV, RANK_ENV, Heartbeats, sweep_orphans

        if world_size < 1:
            raise ValueError(f"RankPool: world_size must be >= 1, got {world_size}")
        for what, per_rank in (("netns", netns), ("rank_env", rank_env)):
            if per_rank is not None and len(per_rank) != world_size:
                raise ValueError(
                    f"RankPool: {what} needs one entry per rank ({world_size}), got {len(per_rank)}"
                )
        self.world_size = world_size
        self.timeout = default_timeout(timedelta(seconds=timeout)).total_seconds()
        self.broken = False
        self.swept = sweep_orphans()
        ctx = mp.get_context("spawn")
        # one pipe per rank, no queues: queues need named semaphores in /dev/shm, which a
        # launcher killed together with multiprocessing's resource tracker would leak
        pipes = [ctx.Pipe() for _ in range(world_size)]
        self._conns = [mine for mine, _ in pipes]
        self._heartbeats = Heartbeats(ctx, world_size)
        self._started = time.monotonic()
        port = free_port()
        owner = os.getpid()
        envs = [
            {
                **(env or {}),
                **(rank_env[r] if rank_env is not None else {}),
                OWNER_ENV: str(owner),
                RANK_ENV: str(r),
            }  # fmt: skip
            for r in range(world_size)
        ]
        self._procs = [
            ctx.Process(
                # the target is the builtin exec, so that unpickling it imports nothing: the
                # rank asks for its parent-death signal before importing dsp and torch (seconds)
                target=exec,
                args=(
                    _BOOTSTRAP,
                    {
                        "_args": (
                            r,
                            world_size,
                            addr,
                            port,
                            backend,
                            self.timeout,
                            threads,
                            list(sys.path),
                            envs[r],
                            pipes[r][1],
                            netns[r] if netns is not None else None,
                            self._heartbeats.stamps,  # not the object: no dsp import
                            owner,
                        )
                    },
                ),  # fmt: skip
                daemon=True,
            )
            for r in range(world_size)
        ]
        try:
            for p, rank_environ in zip(self._procs, envs):
                # The child imports torch before _worker applies ``env``: put its environment
                # in place at spawn time too (e.g. TORCH_CPP_LOG_LEVEL), then restore ours.
                with _environ(rank_environ):
                    p.start()
        except BaseException:
            self.close(kill=True)
            raise

    @property
    def pids(self) -> List[Optional[int]]:
        """The workers' process ids, by rank."""
        return [p.pid for p in self._procs]

    def _hung(self, pending: set, now: float, failed: bool) -> dict:
        """Pending ranks that stopped beating for ``timeout`` s (or never started); once
        another rank failed, also those stopped by a signal or silent for 2 s (a rank stuck in
        start-up makes the others' process-group start time out first)."""
        from dsp.watchdog import process_state

        hung = {}
        for r in sorted(pending):
            p = self._procs[r]
            age = self._heartbeats.age(r, now)
            limit = self.timeout if age is not None else self.timeout + 30  # torch import
            quiet = f"no heartbeat for {age:.0f} s" if age is not None else "never started"
            state = process_state(p.pid)
            late = (age if age is not None else now - self._started) > limit
            if failed and not late:
                late = state.startswith("stopped") or (age is not None and age > 2.0)
            if late:
                hung[r] = (
                    f"rank {r} (pid {p.pid}) stopped answering: {quiet} (timeout "
                    f"{self.timeout:g} s), process {state}"
                )
        return hung

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> List[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results in order.

        Raises:
            RankError: if any rank raised, died or hung (the cause first; see the class).
        """
        from dsp.watchdog import describe_exit, process_state

        if self.broken:
            raise RuntimeError("RankPool: an earlier run left the pool broken; make a new one")
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        results: dict = {}
        errors: dict = {}
        failed_at = None  # when the first failure was seen
        grace = 0.0
        causes: dict = {}
        closed: set = set()  # pipes at EOF: their rank died (its exit code follows)
        while len(results) + len(errors) < self.world_size:
            done = set(results) | set(errors) | set(causes) | closed
            waiting = {self._conns[r]: r for r in range(self.world_size) if r not in done}
            ready = mp_connection.wait(list(waiting), timeout=0.25) if waiting else time.sleep(0.1)
            for conn in ready or []:
                rank = waiting[conn]
                try:
                    ok, value = conn.recv()
                except (EOFError, OSError):  # it died: the exit code is examined below
                    closed.add(rank)
                    continue
                (results if ok else errors)[rank] = value
                if not ok and failed_at is None:
                    failed_at = time.monotonic()
                    grace = min(GRACE_AFTER_ERROR, self.timeout + 5)
            now = time.monotonic()
            pending = set(range(self.world_size)) - set(results) - set(errors)
            for r in sorted(pending):
                code = self._procs[r].exitcode
                if code is not None and r not in causes:
                    causes[r] = f"rank {r} (pid {self._procs[r].pid}) died: {describe_exit(code)}"
            hung = self._hung(pending - set(causes), now, failed=failed_at is not None)
            causes.update(hung)
            if causes and (failed_at is None or grace > GRACE_AFTER_DEATH):
                failed_at, grace = now, GRACE_AFTER_DEATH
            if failed_at is not None and now - failed_at > grace:
                break
            if pending and pending <= set(causes):  # only dead or hung ranks left to hear from
                break
        if not errors and not causes:
            return [results[r] for r in range(self.world_size)]
        pending = set(range(self.world_size)) - set(results) - set(errors)
        # every rank raised: still in step, the pool stays usable; otherwise retire it
        self.broken = bool(pending or causes or results)
        # pending ranks that are stopped or not beating any more are the cause, not those that
        # timed out waiting for them
        now = time.monotonic()
        for r in sorted(pending - set(causes)):
            age, state = self._heartbeats.age(r, now), process_state(self._procs[r].pid)
            if state.startswith("stopped") or age is None or age > 4 * self._heartbeats.period:
                quiet = f"no heartbeat for {age:.0f} s" if age is not None else "never started"
                causes[r] = (
                    f"rank {r} (pid {self._procs[r].pid}) stopped answering: {quiet}, "
                    f"process {state}"
                )
        for r in sorted(pending):
            self._kill(r)
        lines = {r: first_line(e) for r, e in errors.items()}
        if causes:
            secondary = dict(lines)
            for r in sorted(pending - set(causes)):
                secondary[r] = "no answer; ended by the launcher"
        else:
            causes, secondary = split_causes(lines)
            for r in sorted(pending):
                causes[r] = f"rank {r} (pid {self._procs[r].pid}) did not answer within the " \
                    f"{grace:g} s after the first error; ended by the launcher"  # fmt: skip
        raise RankError({**errors, **causes}, causes, secondary)

    def _kill(self, rank: int) -> None:
        p = self._procs[rank]
        if p.is_alive():
            p.kill()  # SIGKILL: also ends a stopped (SIGSTOP) process
        p.join(timeout=10)

    def close(self, *, kill: bool = False) -> None:
        """End the workers: politely (finish the current job), or at once with ``kill``."""
        if kill or self.broken:
            for r in range(self.world_size):
                if r < len(self._procs) and self._procs[r].pid is not None:
                    self._kill(r)
            return
        for conn, p in zip(self._conns, self._procs):
            if p.is_alive():
                try:
                    conn.send(None)
                except (OSError, ValueError):
                    pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # an exception in the launcher (Ctrl-C included): the ranks may be mid-job, end them
        self.close(kill=exc_type is not None)


def spawn(fn: Callable, world_size: int, *args: Any, **kwargs: Any) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` once on ``world_size`` fresh gloo ranks; per-rank results."""
    with RankPool(world_size) as pool:
        return pool.run(fn, *args, **kwargs)
