"""benchmarks/gpu_check.py, the prepared GPU run, exercised on the CPU (--device cpu --quick):
every check runs and passes, and the reports are written."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_runs_every_check_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu",
         "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(results) == [
        "env", "matmul", "model_step", "ring_block", "pack_unpack", "two_ranks_gloo",
        "cli_train", "cli_sample",
    ]  # fmt: skip
    two = results["two_ranks_gloo"]
    assert two["max_err"] < 1e-9 and two["ranks"][0]["sliced_stages"] > 0
    assert two["sent_bytes"] == two["ranks"][0]["predicted_all_ranks"] > 0
    assert all("error" not in r for r in results.values())
    assert results["model_step"]["loss_rel_diff"] == 0.0  # fp32 on the CPU both times
    ring = results["ring_block"]
    assert ring["fused_cpu_kernel"] and max(ring["max_err_one_block_rel"],
                                            ring["max_err_ring_of_4_rel"]) < 1e-4  # fmt: skip
    assert (tmp_path / "sample.gif").stat().st_size > 0
    train = results["cli_train"]
    assert train["tokens_per_s"] > 0 and train["precision"] == "float32"  # CPU: no autocast
    assert "## cli_train: ok" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_says_what_is_wrong():
    script = os.path.join(ROOT, "benchmarks", "gpu_check.py")
    proc = subprocess.run(
        [sys.executable, script, "--device", "cpu", "--only", "env,nope"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "unknown checks ['nope']" in proc.stderr


def _gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import gpu_check

    return gpu_check


def test_ring_blocks_off_the_cpu_kernel(monkeypatch):
    """The einsum block and the log-sum-exp merge, the path a GPU takes, checked here."""
    import argparse

    import dsp.attention.ring as ring

    monkeypatch.setattr(ring, "_fused", lambda x: False)
    r = _gpu_check(monkeypatch).check_ring_block(argparse.Namespace(device="cpu", quick=True))
    assert r["ok"] and not r["fused_cpu_kernel"]
    assert max(r["max_err_one_block_rel"], r["max_err_ring_of_4_rel"]) < 1e-5


def test_a_failing_check_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    gpu_check = _gpu_check(monkeypatch)

    def broken(args):
        raise RuntimeError("no flash kernel for this head size")

    monkeypatch.setitem(gpu_check.CHECKS, "ring_block", broken)
    rc = gpu_check.main(["--device", "cpu", "--quick", "--only", "env,ring_block,matmul",
                         "--out", str(tmp_path)])  # fmt: skip
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1 and list(results) == ["env", "ring_block", "matmul"]
    assert "no flash kernel for this head size" in results["ring_block"]["error"]
    assert results["matmul"]["tflops"] > 0
    assert "## ring_block: FAILED" in (tmp_path / "gpu_check.md").read_text()
