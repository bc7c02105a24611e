"""Helpers of the fault-injection suite: run `dsp` as a child process, find its ranks, wait
for output, and check that nothing is left behind (processes, namespaces, semaphores)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

from dsp.watchdog import rank_processes

#: The timeout the fault tests give `dsp` (seconds): short, so a hang costs seconds.
TIMEOUT = 4
#: What the launcher promises: a fault ends the job within timeout + 30 s.
BOUND = TIMEOUT + 30


def shm_entries() -> set:
    """Names in /dev/shm (POSIX semaphores and shared memory)."""
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _mapped_shm() -> set:
    """/dev/shm names some live process still maps (in use, not leaked)."""
    used = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "/dev/shm/" in line:
                        used.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
        except OSError:
            continue
    return used


def leaked_shm(before: set, wait: float = 10.0) -> set:
    """Entries created since ``before`` that no process maps (leaked), after up to ``wait``
    seconds for the resource tracker to unlink them. Other test runs' live pools are in use,
    hence not counted."""
    deadline = time.monotonic() + wait
    while True:
        new = {n for n in shm_entries() - before if n.startswith(("sem.", "psm_", "mp-"))}
        leaked = new - _mapped_shm()
        if not leaked or time.monotonic() > deadline:
            return leaked
        time.sleep(0.2)


class Dsp:
    """``python -m dsp ARGS`` in its own session; stdout and stderr collected by a thread."""

    def __init__(self, args: List[str], *, env: Optional[dict] = None, cwd=None):
        self.args = args
        full_env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "DSP_TIMEOUT": str(TIMEOUT),
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsp", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
            cwd=cwd,
            start_new_session=True,  # a process group of its own, as in a terminal
        )
        self.lines: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ended_at: Optional[float] = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        """Until ``text`` appears in the output (fails if the process ends first)."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None:
                time.sleep(0.2)
                if text in self.output:
                    return
                raise AssertionError(f"`dsp` ended ({self.proc.returncode}) before {text!r}:\n"
                                     f"{self.output[-3000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output[-3000:]}")
            time.sleep(0.05)

    def ranks(self, n: int, timeout: float = 60.0) -> dict:
        """``{rank: pid}`` of this job's ``n`` local ranks (waits for them to exist)."""
        deadline = time.monotonic() + timeout
        while True:
            found = {int(r): pid for pid, _, r in rank_processes(owner=self.pid) if r.isdigit()}
            if len(found) >= n:
                return found
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"ranks {found} of {n}:\n{self.output[-3000:]}")
            time.sleep(0.1)

    def wait(self, timeout: float = BOUND + 30) -> float:
        """Wait for the end; return the seconds it took from now."""
        start = time.monotonic()
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()
        self._reader.join(timeout=10)
        self.ended_at = time.monotonic()
        return self.ended_at - start

    def signal(self, sig: int, *, group: bool = False) -> None:
        if group:
            os.killpg(self.pid, sig)
        else:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """The test's own cleanup: the job's process group and its ranks."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid, _, _ in rank_processes(owner=self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


def no_ranks_left(owner: int, wait: float = 10.0) -> list:
    """The ranks of ``owner`` still alive after up to ``wait`` seconds (want: none)."""
    deadline = time.monotonic() + wait
    while True:
        left = [pid for pid, _, _ in rank_processes(owner=owner) if _alive(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def no_tmp(root: Path) -> list:
    return sorted(str(p) for p in Path(root).glob("*.tmp")) if Path(root).exists() else []
