"""Workload-matched link rates: the target's ratio comes from the cost model."""

import pytest

from dsp.bench.runner import BenchConfig
from dsp.bench.target import TargetWorkload, bench_dsp_cost, matched_rate, target_ratio


def test_stdit_xl_on_ib_is_about_a_third_communication():
    """The issue's rough count: STDiT-XL/2, T = 64, S = 4096, N = 4..8 over IB: ~1/3."""
    for n in (4, 8):
        r = target_ratio("ib", n)
        assert 0.2 < r["target_ratio"] < 0.5, r
        assert "stdit-xl/2" in r["target_workload"] and "ib" in r["target_workload"]
    # NVLink has 9x the bandwidth: far less communication-bound
    assert target_ratio("nvlink", 4)["target_ratio"] < target_ratio("ib", 4)["target_ratio"] / 5


def test_a_wider_target_or_checkpointing_changes_the_ratio():
    base = target_ratio("ib", 4)["target_ratio"]
    xxl = target_ratio("ib", 4, TargetWorkload(model="stdit-xxl/2"))["target_ratio"]
    assert xxl < base  # compute grows with C^2, bytes with C


def test_matched_rate_reproduces_the_ratio():
    cfg = BenchConfig(frames=16, height=32, width=32, hidden=256, heads=8, depth=2)
    # a proxy step of 0.5 s at 50 GFLOP/s per rank
    bench = bench_dsp_cost(cfg, 2, 0.5, 50e9)
    assert 0 < bench["efficiency"] and bench["bytes"] > 0
    rate = matched_rate(0.25, bench)
    assert bench["bytes"] / rate / bench["compute_s"] == pytest.approx(0.25)


def test_bench_target_flags():
    from dsp.cli.bench import target_from_args
    from dsp.cli.main import build_parser

    args = build_parser().parse_args(
        ["bench", "--link", "ib", "--target-model", "stdit-xxl/2", "--target-tokens", "32x48"]
    )
    t = target_from_args(args)
    assert (t.model, t.tokens_h, t.tokens_w, t.frames) == ("stdit-xxl/2", 32, 48, 64)
