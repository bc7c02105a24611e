"""A rank that dies or stops, a launcher that is killed, Ctrl-C: `dsp train` and `dsp sample`
end within timeout + 30 s, name the rank, and leave no process or semaphore behind."""

from __future__ import annotations

import os
import signal
import time

import pytest

from dsp.train.checkpoint import verify_checkpoint

from ._proc import BOUND, Dsp, leaked_shm, no_ranks_left, no_tmp, shm_entries

TRAIN = ["train", "--world-size", "2", "--sp", "2", "--steps", "100000",
         "--log-every", "1", "--set", "depth=1"]  # fmt: skip
SAMPLE = ["sample", "--world-size", "2", "--steps", "100000", "--model", "stdit-tiny"]


def _start(args, tmp_path) -> Dsp:
    job = Dsp(args + ["--out", str(tmp_path / "v.gif")] if args[0] == "sample" else args)
    return job


def _running(job: Dsp) -> dict:
    """The job's ranks once they are inside the job (train: after step 2), looked up then:
    processes a launcher starts and ends before its ranks' loop are not the ranks."""
    job.ranks(2)
    if job.args[0] == "train":
        job.wait_for("step 2/")
    else:
        time.sleep(6)  # past torch's import and the process group: inside the sampling loop
    return job.ranks(2)


def _record(tmp_path, name, seconds):
    """Figures for docs/reliability.md (printed with -s; asserted below)."""
    print(f"{name}: ended {seconds:.1f} s after the fault (bound {BOUND} s)")


@pytest.mark.parametrize("command", ["train", "sample"])
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_a_rank_dies_or_stops(tmp_path, command, sig):
    before = shm_entries()
    job = _start(TRAIN if command == "train" else SAMPLE, tmp_path)
    try:
        ranks = _running(job)
        victim = ranks[1]
        os.kill(victim, getattr(signal, sig))
        took = job.wait()
    finally:
        job.kill()
    _record(tmp_path, f"{command} {sig} rank 1", took)
    out = job.output
    assert job.proc.returncode == 1, out[-3000:]
    assert took <= BOUND
    if sig == "SIGKILL":
        assert took <= 15, "a death is noticed at once (measured 1-2 s)"
        want = f"rank 1 (pid {victim}) died: SIGKILL"
    else:  # measured timeout + 1 to 4 s; the bound allows for a loaded machine
        want = f"rank 1 (pid {victim}) stopped answering"
    first = [line for line in out.splitlines() if line.startswith(f"dsp {command}: error:")]
    assert first and want in first[0], out[-3000:]  # the cause comes first, on the error line
    assert "Traceback" not in out
    assert no_ranks_left(job.pid) == []
    assert leaked_shm(before) == set()


@pytest.mark.parametrize("command, when", [("train", "running"), ("sample", "running"),
                                           ("train", "starting")])  # fmt: skip
def test_the_launcher_is_killed(tmp_path, command, when):
    """SIGKILL of the parent: no handler runs, the ranks die with it (the parent-death signal,
    set before a rank imports torch), and nothing is left in /dev/shm."""
    before = shm_entries()
    job = _start(TRAIN if command == "train" else SAMPLE, tmp_path)
    try:
        ranks = _running(job) if when == "running" else job.ranks(2)  # starting: importing
        job.signal(signal.SIGKILL)
        start = time.monotonic()
        left = no_ranks_left(job.pid, wait=BOUND)
        took = time.monotonic() - start
    finally:
        job.kill()
    _record(tmp_path, f"{command} launcher SIGKILL ({when})", took)
    assert left == [] and took <= 5, (ranks, left)
    assert leaked_shm(before) == set()


def test_ctrl_c_names_the_intact_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    job = Dsp(TRAIN + ["--ckpt-dir", str(ckpt), "--save-every", "2"])
    try:
        job.ranks(2)
        job.wait_for("step 3/")
        job.signal(signal.SIGINT, group=True)  # what a terminal sends to the foreground group
        took = job.wait()
    finally:
        job.kill()
    _record(tmp_path, "train Ctrl-C", took)
    out = job.output
    assert job.proc.returncode == 130, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("dsp train: interrupted")]
    assert lines and "is intact: continue with --resume" in lines[0], out[-3000:]
    named = lines[0].split("interrupted; ", 1)[1].split(" is intact")[0]
    assert verify_checkpoint(named) is None, "the checkpoint it names is intact"
    assert "Traceback" not in out and took <= 10
    assert no_ranks_left(job.pid) == [] and no_tmp(ckpt) == []


def _namespaces_of(pid: int) -> list:
    from dsp.bench.link import list_namespaces

    return [n for n in list_namespaces() if f"-{pid}-" in n]


def _netns_ok() -> bool:
    from dsp.bench.link import netns_available

    return netns_available()[0]


@pytest.mark.skipif(not _netns_ok(), reason="network namespaces need root and iproute2")
def test_bench_link_launcher_is_killed(tmp_path):
    """SIGKILL of `dsp bench --link`: its ranks die with it, its watchdog deletes the three
    namespaces (and kills anything left inside), no semaphore is left."""
    before = shm_entries()
    job = Dsp(["bench", "--link", "25MB/s", "--world-size", "2", "--strategy", "dsp",
               "--frames", "4", "--height", "8", "--width", "8", "--hidden", "16", "--heads",
               "2", "--depth", "1", "--repeats", "100000", "--out", str(tmp_path)])  # fmt: skip
    try:
        ranks = job.ranks(2)
        deadline = time.monotonic() + 60
        while len(_namespaces_of(job.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        names = _namespaces_of(job.pid)
        assert len(names) == 3, job.output[-3000:]
        time.sleep(1)
        job.signal(signal.SIGKILL)
        start = time.monotonic()
        left = no_ranks_left(job.pid, wait=BOUND)
        while _namespaces_of(job.pid) and time.monotonic() - start < BOUND:
            time.sleep(0.1)
        took = time.monotonic() - start
    finally:
        job.kill()
    _record(tmp_path, "bench --link launcher SIGKILL", took)
    assert left == [] and _namespaces_of(job.pid) == [], (ranks, left)
    assert took <= 10
    assert leaked_shm(before) == set()
