"""`dsp train` and `dsp sample` under torchrun on two "hosts": two network namespaces on this
machine joined by a bridge (dsp.bench.link.EmulatedLink), c10d rendezvous across them.

Each node runs ``torchrun --nnodes 2 --nproc-per-node 2`` inside its namespace; gloo binds to
the namespace's interface (GLOO_SOCKET_IFNAME), so every byte between the nodes crosses the
bridge. The losses and the sampled video must equal one process. Needs root and iproute2
(CI runs as root); elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from dsp.sample import SampleConfig, sample
from dsp.train import train

from . import _cases

#: the `dsp` command of this environment (torchrun --no-python runs it as each worker)
DSP = shutil.which("dsp", path=os.path.dirname(sys.executable)) or shutil.which("dsp")

try:
    from dsp.bench.link import EmulatedLink, netns_available

    _OK, _WHY = netns_available()
except ImportError as e:  # pragma: no cover - the bench package is part of dsp
    _OK, _WHY = False, f"dsp.bench.link is missing: {e}"

pytestmark = [
    pytest.mark.skipif(not _OK, reason=f"no network namespaces here: {_WHY}"),
    pytest.mark.skipif(DSP is None, reason="the `dsp` command is not installed (pip install -e .)"),
]

PORT = 29400  # inside the namespaces: nothing else listens there
TIMEOUT = 240


def _torchrun(link, rdzv_id: str, args: list, tmp_path) -> list:
    """Run ``python -m dsp.cli.main ARGS`` with torchrun on both nodes; return their outputs."""
    procs = []
    for node, ns in enumerate(link.namespaces):
        cmd = [
            "ip", "netns", "exec", ns,
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{link.addresses[0]}:{PORT}",
            "--rdzv-id", rdzv_id, "--rdzv-conf", f"is_host={int(node == 0)}",
            "--local-addr", link.addresses[node], "--max-restarts", "0",
            "--no-python", DSP, *args,
        ]  # fmt: skip
        env = {
            **os.environ,
            "GLOO_SOCKET_IFNAME": link.ifnames[node],
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        log = open(tmp_path / f"{rdzv_id}-node{node}.log", "w+")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))  # fmt: skip
    outputs = []
    try:
        for proc, _log in procs:
            proc.wait(timeout=TIMEOUT)
    finally:
        for proc, log in procs:
            if proc.poll() is None:  # our own torchrun and its workers: their process group
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.seek(0)
            outputs.append(log.read())
            log.close()
    for node, ((proc, _), out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {node} exited {proc.returncode}:\n{out[-4000:]}"
    return outputs


def test_torchrun_two_nodes_train_and_sample(tmp_path):
    steps = 4
    ckpt, log_json, video = tmp_path / "ckpt", tmp_path / "losses.json", tmp_path / "v.pt"
    with EmulatedLink(2, 1e9, prefix="dsptrain") as link:
        _torchrun(
            link,
            "train",
            ["train", "--dp", "2", "--sp", "2", "--steps", str(steps), "--lr", "3e-3",
             "--warmup", "2", "--no-progress", "--ckpt-dir", str(ckpt), "--log-json",
             str(log_json)],
            tmp_path,
        )  # fmt: skip
        out = _torchrun(
            link,
            "sample",
            ["sample", "--checkpoint", str(ckpt), "--cfg-parallel", "--steps", "4",
             "--out", str(tmp_path / "v.gif"), "--save-tensor", str(video)],
            tmp_path,
        )  # fmt: skip
    logged = json.loads(log_json.read_text())
    assert logged["layout"]["world_size"] == 4 and logged["layout"]["dp"] == 2
    ref = train(_cases.config(steps=steps)).losses
    rel = max(abs(a - b) / abs(b) for a, b in zip(logged["losses"], ref))
    print(f"2 nodes x 2 ranks, (dp, sp) = (2, 2): max relative loss diff {rel:.2e}")
    assert len(logged["losses"]) == steps and rel <= 1e-5
    # sampling: cond on one node, uncond on the other, DSP inside each node
    assert "uncond, sp 1/2" in "".join(out)
    got = torch.load(video)["latents"]
    want = sample(SampleConfig(checkpoint=str(ckpt), steps=4)).latents
    assert (got - want).abs().max().item() <= 1e-6
