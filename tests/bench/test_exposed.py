"""Exposed communication: the seconds blocked in communication calls, measured in the
collectives layer (CommLog.wait_s) and recorded by the bench next to step_time_s."""

import pytest
import torch

from dsp.bench.runner import BenchConfig, rank_bench, summarize
from dsp.comm.log import CommLog, comm_log


def _waits():
    """A blocking all-to-all and a ring attention both add wait time; bytes unchanged."""
    import dsp
    from dsp.attention.ring import ring_attention
    from dsp.mesh import group_info

    x = torch.randn(4, 6, 8)
    with comm_log() as log:
        y = dsp.switch(x, 0, 1, src_size=4 * group_info(None).size)
    a2a = log.wait_s
    q = torch.randn(1, 5, 2, 4, requires_grad=True)
    with comm_log() as ring:
        ring_attention(q, q, q).sum().backward()
    return a2a, ring.wait_s, log.bytes_sent, y.shape


def test_a_log_counts_wait_and_clears():
    log = CommLog()
    log.wait_s = 1.5
    log.clear()
    assert log.wait_s == 0.0


@pytest.mark.parametrize("n", [2, 3])
def test_collectives_and_ring_waits_are_timed(pools, n):
    for a2a, ring, sent, _ in pools.run(n, _waits):
        assert a2a > 0 and ring > 0 and sent > 0


ONE = {"qkv_one_all_to_all": True}
TINY = dict(model="stdit-tiny", frames=4, height=8, width=8, depth=1, warmup=1, repeats=2)


def test_two_rank_dsp_records_exposed_comm_below_step_time(pools):
    cfg = BenchConfig(strategy="dsp", world_size=2, **TINY)
    row = summarize(cfg, pools.run(2, rank_bench, cfg))
    ex, st = row["exposed_comm_s"], row["step_time_s"]
    assert len(ex["all"]) == 2 and len(ex["per_rank"]) == 2
    for e, s in zip(ex["all"], st["all"]):
        assert 0 < e < s
    assert 0 < ex["median"] < st["median"]
    busy = row["cpu_busy"]  # CPU seconds of each rank's process per step, and their share
    assert len(busy["per_rank_s"]) == 2 and all(c > 0 for c in busy["per_rank_s"])
    assert busy["utilization"] == pytest.approx(busy["sum_s"] / (busy["cores"] * st["median"]))


def test_one_process_records_zero(pools):
    cfg = BenchConfig(strategy="none", world_size=1, **TINY)
    row = summarize(cfg, pools.run(1, rank_bench, cfg))
    assert row["exposed_comm_s"]["all"] == [0.0, 0.0] and row["step_time_s"]["median"] > 0


def _row(strategy, n, step, exposed, nbytes):
    return {
        "strategy": strategy,
        "world_size": n,
        "frames": 4,
        "height": 8,
        "width": 8,
        "step_time_s": {"median": step},
        "exposed_comm_s": {"median": exposed},
        "bytes_sent_forward": nbytes,
        "bytes_sent_backward": nbytes,
        "bytes_sent_grad_sync": 0,
    }


def test_report_splits_compute_exposed_hidden_and_plots(tmp_path):
    from dsp.bench.report import _comm_lines, comm_split, plot

    meta = {"link": {"per_world_size": {"2": {"achieved_bytes_per_s": 1e6}}}}
    rows = [_row("none", 1, 2.0, 0.0, 0), _row("ring", 2, 1.5, 0.2, 500_000)]
    none, ring = comm_split(meta, rows)
    assert (none["compute_s"], none["exposed_s"], none["hidden_s"]) == (2.0, 0.0, 0.0)
    assert ring["compute_s"] == pytest.approx(1.3) and ring["exposed_s"] == 0.2
    assert ring["comm_at_link_s"] == pytest.approx(1.0) and ring["hidden_s"] == pytest.approx(0.8)
    assert any(
        line.startswith("| ring | 2 | 4x8x8 | 1.500 | 1.300 | 0.200 | 13 |")
        for line in _comm_lines(meta, rows)
    )
    full = [dict(r, samples_per_s=1.0, tokens_per_s=1.0, patches=16) for r in rows]
    paths = plot(full, str(tmp_path), meta=meta)
    assert any(p.endswith("comm.png") for p in paths)


@pytest.mark.parametrize("choice,want", [("three", [{}]), ("one", [ONE]), ("both", [{}, ONE])])
def test_ulysses_qkv_flag_adds_rows_and_reports_name_them(choice, want):
    from dsp.bench.report import label
    from dsp.cli.bench import configs_from_args
    from dsp.cli.main import build_parser

    args = build_parser().parse_args(
        ["bench", "--strategy", "dsp,ulysses", "--world-size", "2", "--ulysses-qkv", choice]
    )
    configs = configs_from_args(args)
    assert [c.options for c in configs if c.strategy == "ulysses"] == want
    assert [c.options for c in configs if c.strategy == "dsp"] == [{}]
    names = {label({"strategy": c.strategy, "options": c.options}) for c in configs}
    assert ("ulysses (qkv in one)" in names) == (choice != "three")


@pytest.mark.parametrize(
    "n,rate,want",
    [
        (2, 1e6, "dsp (auto: 2 chunks)"),
        (2, 1e12, "dsp (auto: blocking)"),
        (4, 1e6, "dsp (auto: blocking)"),
    ],
)
def test_chunks_auto_plans_from_the_measured_link(pools, monkeypatch, n, rate, want):
    """--chunks auto: the ranks plan slices from the link and FLOP/s the sweep measured; a
    link as slow as the compute slices (as many as 4 frames over 2 ranks allow), a fast one
    does not, and neither do more ranks than cores (4 ranks on 2 cores, 8 frames)."""
    import dataclasses
    import os

    from dsp.bench.report import label
    from dsp.bench.sweep import _timed
    from dsp.cli.bench import configs_from_args
    from dsp.cli.main import build_parser

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    args = build_parser().parse_args(
        ["bench", "--strategy", "dsp", "--world-size", str(n), "--chunks", "1,auto"]
    )
    assert [c.options for c in configs_from_args(args)] == [{}, {"chunks": "auto"}]
    meta = {"emulated": True, "cpu_flops_per_rank": 1e8, "achieved_bytes_per_s": rate}
    cfg = BenchConfig(strategy="dsp", world_size=n, options={"chunks": "auto"})
    cfg = dataclasses.replace(_timed(cfg, meta), **dict(TINY, frames=2 * n))
    assert cfg.options["cluster"]["overlap"] == (1.0 if n <= 2 else 0.0)
    one = _timed(BenchConfig(strategy="dsp", world_size=1, options={"chunks": "auto"}), meta)
    assert one.options == {"chunks": 1}  # nothing to overlap on one rank
    assert cfg.options["training"] is True
    row = summarize(cfg, pools.run(n, rank_bench, cfg))
    assert label(row) == want, row["chunks_chosen"]
