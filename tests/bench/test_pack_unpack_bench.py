"""benchmarks/pack_unpack.py: its statistics and its reading of which variants copy."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SPEC = importlib.util.spec_from_file_location(
    "pack_unpack", os.path.join(ROOT, "benchmarks", "pack_unpack.py")
)
pack_unpack = importlib.util.module_from_spec(_SPEC)  # the script, without touching sys.path
_SPEC.loader.exec_module(pack_unpack)


def test_median_interval_brackets_the_median():
    values = [float(v) for v in range(1, 102)]  # median 51
    lo, hi = pack_unpack.median_ci(values)
    assert lo < 51 < hi
    assert (lo, hi) == (41.0, 61.0)  # ranks 50 -+ 1.96 * sqrt(101) / 2 (0-based 40 and 60)
    assert pack_unpack.median_ci([3.0]) == [3.0, 3.0]


def test_copies_tells_a_view_from_a_copy():
    x = torch.randn(4, 6)
    assert not pack_unpack.copies(lambda: x.view(24))
    assert not pack_unpack.copies(lambda: [x[1:], x.t()])
    assert pack_unpack.copies(lambda: x.t().contiguous())
    assert pack_unpack.copies(lambda: (x.clone(), [3, 3]))


@pytest.mark.parametrize("b", [1, 2])
def test_which_switch_sides_copy(b):
    """At B = 1 the q/k/v unpack and the output pack need no copy; at B = 2 both copy."""
    (case_in, case_out, qkv) = pack_unpack.cases(b, 16, 4, 2, 2, None).values()
    assert pack_unpack.copies(case_in["ours_pack"])
    assert pack_unpack.copies(case_in["ours_unpack"]) == (b > 1)
    assert pack_unpack.copies(case_out["ours_pack"]) == (b > 1)
    assert pack_unpack.copies(case_out["ours_unpack"])
    assert pack_unpack.copies(qkv["ours_pack"]) and pack_unpack.copies(qkv["ours_unpack"])


@pytest.mark.parametrize("dtype,itemsize", [("float32", 4), ("bfloat16", 2)])
def test_quick_run_writes_its_reports(tmp_path, dtype, itemsize):
    out = tmp_path / "pu"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "pack_unpack.py"), "--quick",
         "--repeats", "5", "--dtype", dtype, "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "pu.json").read_text())
    assert (data["meta"]["device"], data["meta"]["dtype"]) == ("cpu", dtype)
    rows = data["results"]
    assert rows[0]["mib"] * 2**20 == 1 * 128 * 4 * 16 * itemsize  # one rank's (B, S/N, H, D)
    assert [r["case"] for r in rows] == [
        "q/k/v seq->heads", "out heads->seq", "qkv in one seq->heads"
    ]  # fmt: skip
    for r in rows:
        lo, hi = r["pack_over_clone_ci"]
        assert lo <= r["pack_over_clone"] <= hi
    assert not rows[0]["ours_unpack_copies"] and rows[0]["ours_pack_copies"]
    assert [(r["mib"], r["run"]) for r in data["size_sweep"]] == [(1, 512)]
    md = (tmp_path / "pu.md").read_text()
    assert (
        "- pack, where it copies (2 cases)" in md
        and "## The strided copy by size and run length" in md
    )
