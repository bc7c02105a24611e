"""Elastic training across two "hosts": `torchrun --max-restarts 1` on two network namespaces
(as tests/train/test_multinode.py builds them); SIGKILL of one worker makes torchrun restart
the whole group, `dsp train --resume` picks up the newest intact checkpoint by itself, and the
losses equal an uninterrupted run. Root and iproute2 only (CI runs as root)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dsp.train import train

from . import _cases
from .test_multinode import _OK, _WHY, DSP, PORT

pytestmark = [
    pytest.mark.skipif(not _OK, reason=f"no network namespaces here: {_WHY}"),
    pytest.mark.skipif(DSP is None, reason="the `dsp` command is not installed (pip install -e .)"),
]

STEPS, EVERY = 24, 4
TIMEOUT = 240


def _workers(run_id: str) -> dict:
    """``{global rank: pid}`` of the torchrun workers of ``run_id`` (first attempt)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"TORCHELASTIC_RUN_ID") == run_id.encode() and b"RANK" in env:
            if env.get(b"TORCHELASTIC_RESTART_COUNT") == b"0":
                found[int(env[b"RANK"])] = int(name)
    return found


def test_a_killed_worker_restarts_the_group_which_resumes(tmp_path):
    from dsp.bench.link import EmulatedLink

    ckpt, log_json = tmp_path / "ckpt", tmp_path / "losses.json"
    run_id = f"elastic{os.getpid()}"
    args = ["train", "--dp", "2", "--sp", "2", "--steps", str(STEPS), "--lr", "3e-3",
            "--warmup", "2", "--ckpt-dir", str(ckpt), "--save-every", str(EVERY), "--keep",
            "3", "--resume", "--timeout", "10", "--log-json", str(log_json)]  # fmt: skip
    with EmulatedLink(2, 1e9, prefix="dspelastic") as link:
        procs = []
        for node, ns in enumerate(link.namespaces):
            cmd = [
                "ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
                "--nnodes", "2", "--nproc-per-node", "2", "--max-restarts", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{link.addresses[0]}:{PORT}",
                "--rdzv-id", run_id, "--rdzv-conf", f"is_host={int(node == 0)}",
                "--local-addr", link.addresses[node], "--no-python", DSP, *args,
            ]  # fmt: skip
            env = {**os.environ, "GLOO_SOCKET_IFNAME": link.ifnames[node],
                   "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                   # a fresh store per rendezvous round: with the shared one, the restarted
                   # workers can read the dead workers' gloo addresses (connection refused)
                   "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # fmt: skip
            log = open(tmp_path / f"node{node}.log", "w+")
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))  # fmt: skip
        try:
            # the first checkpoint is written: kill global rank 3 (node 1) with SIGKILL
            deadline = time.monotonic() + TIMEOUT
            while not (ckpt / "latest").is_file() and time.monotonic() < deadline:
                time.sleep(0.05)
            victim = _workers(run_id).get(3)
            assert victim is not None, "rank 3 of the first attempt is running"
            killed_at = (ckpt / "latest").read_text().strip()
            os.kill(victim, signal.SIGKILL)
            for proc, _ in procs:
                proc.wait(timeout=TIMEOUT)
        finally:
            outputs = []
            for proc, log in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                log.seek(0)
                outputs.append(log.read())
                log.close()
    for node, ((proc, _), out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {node} exited {proc.returncode}:\n{out[-4000:]}"
    text = "".join(outputs)
    assert "restart" in text.lower() or "Restarting" in text, text[-4000:]
    logged = json.loads(log_json.read_text())  # written by the last attempt's rank 0
    start = logged["start_step"]
    assert start >= int(killed_at.split("_")[1]) and start % EVERY == 0 and start > 0
    ref = train(_cases.config(steps=STEPS)).losses
    rel = max(abs(a - b) / abs(b) for a, b in zip(logged["losses"], ref[start:]))
    print(f"killed rank 3 after {killed_at}; resumed at step {start}: max rel diff {rel:.1e}")
    assert len(logged["losses"]) == STEPS - start and rel <= 1e-5
