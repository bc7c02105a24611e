"""Under torchrun a stopped worker is named too: the survivors' collectives time out after
--timeout, their heartbeat check through torchrun's store finds the rank whose counter stopped,
and the error says so (instead of blaming the survivor's own timeout)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ._proc import TIMEOUT

DSP = shutil.which("dsp", path=os.path.dirname(sys.executable)) or shutil.which("dsp")


def _worker(parent: int, rank: int, timeout: float = 60.0) -> int:
    """The pid of torchrun worker ``rank`` (a child of ``parent`` with RANK=rank)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid != parent:
                    continue
                with open(f"/proc/{name}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if f"RANK={rank}".encode() in env:
                return int(name)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.mark.skipif(DSP is None, reason="the `dsp` command is not installed (pip install -e .)")
def test_stopped_worker_is_named_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "--max-restarts", "0", "--no-python", DSP, "train", "--sp", "2", "--steps",
           "100000", "--set", "depth=1", "--timeout", str(TIMEOUT)]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    lines = []
    try:
        for line in proc.stdout:  # until training runs
            lines.append(line)
            if "step 2/" in line:
                break
        victim = _worker(proc.pid, 1)
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        named = None
        for line in proc.stdout:
            lines.append(line)
            if named is None and "stopped answering" in line:
                named = time.monotonic() - stopped
                # torchrun now SIGTERMs the workers and waits 30 s before SIGKILL, which a
                # stopped one needs; let it take the SIGTERM instead (torchrun's grace, not ours)
                os.kill(victim, signal.SIGCONT)
        proc.wait(timeout=120)
        ended = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "".join(lines)
    print(f"torchrun SIGSTOP rank 1: named after {named} s, torchrun ended after {ended:.1f} s")
    assert proc.returncode != 0
    assert "rank 1 stopped answering (no heartbeat); rank 0 gave up" in out, out[-3000:]
    assert named is not None and named <= TIMEOUT + 30
    assert ended <= TIMEOUT + 30
    assert not os.path.exists(f"/proc/{victim}") or _zombie(victim)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
