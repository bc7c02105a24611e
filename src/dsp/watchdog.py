"""Process hygiene for local ranks: die with the parent, heartbeats, exit causes, orphan sweeps.

Used by :class:`dsp.launch.RankPool` (and the torchrun path of the ``dsp`` commands):

* :func:`die_with_parent`: a rank asks the kernel for ``SIGKILL`` when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), so killing the launcher, even with ``SIGKILL``, never leaves
  ranks behind (and the multiprocessing resource tracker, which waits for every holder of its
  pipe, then exits and unlinks the queues' semaphores);
* :class:`Heartbeats`: one shared ``CLOCK_MONOTONIC`` time stamp per rank, refreshed twice a
  second by a thread in the rank. A stopped (``SIGSTOP``) or wedged rank stops beating, so
  the launcher can name the rank that stopped answering instead of the survivor that timed
  out waiting for it;
* :func:`describe_exit`: ``"SIGKILL"`` / ``"exit code 3"``;
* :func:`sweep_orphans`: kill local ranks whose launcher is gone (marked by
  ``DSP_RANK_OWNER=<pid>`` in their environment), e.g. ranks started before this version;
* :func:`check_local_world`: refuse local world sizes this machine cannot hold;
* :class:`StoreHeartbeats`: the same idea under torchrun, through the job's TCPStore, so that
  a rank whose collective timed out can name the rank that stopped answering.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading
import time
from typing import List, Optional

__all__ = [
    "OWNER_ENV",
    "RANK_ENV",
    "Heartbeats",
    "StoreHeartbeats",
    "check_local_world",
    "describe_exit",
    "die_with_parent",
    "process_state",
    "sweep_orphans",
]

#: Environment markers of a local rank: its launcher's pid and its rank.
OWNER_ENV = "DSP_RANK_OWNER"
RANK_ENV = "DSP_LOCAL_RANK_OF_POOL"
#: ``PR_SET_PDEATHSIG`` from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1
#: Memory one local CPU rank needs at least (Python, torch, gloo; measured ~330 MB RSS).
RANK_MEMORY = 400 * 2**20


def die_with_parent(parent_pid: int) -> None:
    """Ask for ``SIGKILL`` when the parent dies; exit now if it already has (Linux only)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watchdog of the pool still applies
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class Heartbeats:
    """One shared time stamp per rank (``time.monotonic()``, system-wide on Linux).

    Create it in the launcher, pass it to the ranks (a ``multiprocessing`` shared array), call
    :meth:`start` in each rank; :meth:`age` says how long ago rank ``r`` last beat
    (``None`` before its first beat).
    """

    period = 0.5

    def __init__(self, ctx, world_size: int):
        self._stamps = ctx.RawArray("d", world_size)

    @property
    def stamps(self):
        """The shared array (what a rank process receives: it unpickles without dsp)."""
        return self._stamps

    def start(self, rank: int) -> None:
        self.start_on(self._stamps, rank)

    @classmethod
    def start_on(cls, stamps, rank: int) -> None:
        """Start rank ``rank``'s heartbeat thread on the shared array ``stamps``."""

        def beat():
            while True:
                stamps[rank] = time.monotonic()
                time.sleep(cls.period)

        threading.Thread(target=beat, name="dsp-heartbeat", daemon=True).start()

    def age(self, rank: int, now: Optional[float] = None) -> Optional[float]:
        stamp = self._stamps[rank]
        if stamp == 0.0:
            return None
        return (now if now is not None else time.monotonic()) - stamp


def describe_exit(exitcode: Optional[int]) -> str:
    """``"SIGKILL"`` for a negative exit code (killed by a signal), else ``"exit code N"``."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def process_state(pid: int) -> str:
    """The kernel's state of ``pid`` in words (``"stopped (SIGSTOP)"``, ``"running"``...)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "unknown"
    return {
        "R": "running",
        "S": "sleeping",
        "D": "in uninterruptible I/O",
        "T": "stopped (SIGSTOP)",
        "t": "stopped by a debugger",
        "Z": "a zombie",
    }.get(state, state)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key in (OWNER_ENV.encode(), RANK_ENV.encode()):
            out[key.decode()] = value.decode(errors="replace")
    return out


def rank_processes(owner: Optional[int] = None) -> List[tuple]:
    """``(pid, owner pid, rank)`` of the local ranks on this machine (of ``owner`` only)."""
    found = []
    if not os.path.isdir("/proc"):
        return found
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        env = _environ(int(name))
        if OWNER_ENV not in env or not env[OWNER_ENV].isdigit():
            continue
        if owner is not None and int(env[OWNER_ENV]) != owner:
            continue
        found.append((int(name), int(env[OWNER_ENV]), env.get(RANK_ENV, "?")))
    return found


def sweep_orphans() -> List[int]:
    """``SIGKILL`` local ranks whose launcher no longer exists; return their pids.

    A rank whose launcher pid was reused by an unrelated live process is left alone (it would
    be inert: nothing sends it work).
    """
    killed = []
    for pid, owner, _ in rank_processes():
        if owner == os.getpid() or _pid_alive(owner):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return killed


def _available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def local_capacity() -> tuple:
    """``(most local ranks, cores, available bytes)``: at most 4 ranks per core (at least 8)
    and :data:`RANK_MEMORY` per rank within the available memory."""
    cores = os.cpu_count() or 1
    most = max(8, 4 * cores)
    avail = _available_memory()
    if avail is not None:
        most = min(most, max(1, avail // RANK_MEMORY))
    return most, cores, avail


def check_local_world(world_size: int, *, force: bool = False, flag: str = "--world-size") -> None:
    """Refuse ``world_size`` local ranks beyond :func:`local_capacity` unless ``force``.

    Raises:
        ValueError: one line naming the flag, the machine's cores and memory, and the fix.
    """
    if world_size < 1:
        raise ValueError(f"{flag} must be >= 1, got {world_size}")
    most, cores, avail = local_capacity()
    if force or world_size <= most:
        return
    mem = f", {avail / 2**30:.1f} GiB available" if avail is not None else ""
    need = world_size * RANK_MEMORY / 2**30
    raise ValueError(
        f"{flag} {world_size}: this machine ({cores} cores{mem}) holds at most {most} local "
        f"ranks ({world_size} need about {need:.0f} GiB); use fewer, torchrun across "
        "machines, or --force to start them anyway"
    )


class StoreHeartbeats:
    """Heartbeats of torchrun workers: counters in the job's TCPStore (``MASTER_ADDR:PORT``).

    Each rank's thread adds 1 to its counter twice a second over a client connection of its
    own. :meth:`silent` reads every counter twice, ``wait`` seconds apart (no clocks to
    compare across hosts): the ranks whose counter did not move are stopped, dead or wedged.
    """

    period = 0.5

    def __init__(self, rank: int, world_size: int):
        from datetime import timedelta

        from torch.distributed import TCPStore

        self.rank, self.world_size = rank, world_size
        self._addr = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._prefix = f"dsp/heartbeat/{run}/{attempt}/"
        self._client = lambda: TCPStore(
            *self._addr, is_master=False, timeout=timedelta(seconds=5), wait_for_workers=False
        )
        store = self._client()
        self._stop = threading.Event()

        def beat():
            key = f"{self._prefix}{rank}"
            while not self._stop.is_set():
                try:
                    store.add(key, 1)
                except Exception:  # noqa: BLE001 - the store's host is gone: nothing to tell
                    return
                self._stop.wait(self.period)

        self._thread = threading.Thread(target=beat, name="dsp-heartbeat", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop beating and join the thread: a process must not exit while it is inside a
        store call (its C++ client is then torn down under it, and the process aborts)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def silent(self, wait: float = 2.0) -> Optional[List[int]]:
        """Ranks (other than this one) whose heartbeat stopped; ``None`` if the store itself
        does not answer (its host, torchrun's agent or rank 0, is gone or stopped)."""
        try:
            store = self._client()
            keys = [f"{self._prefix}{r}" for r in range(self.world_size)]
            first = [store.add(k, 0) for k in keys]
            time.sleep(wait)
            second = [store.add(k, 0) for k in keys]
        except Exception:  # noqa: BLE001
            return None
        return [r for r in range(self.world_size) if r != self.rank and first[r] == second[r]]
