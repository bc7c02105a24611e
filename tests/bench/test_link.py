"""The emulated interconnect: namespaces, rate limit, cleanup, RankPool inside it, calibration.

Tests that build namespaces need root and iproute2 (``ip``, ``tc``); CI runs as root, so they
run there. Each test uses its own namespace prefix, so it never touches another run's links.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dsp.bench import calibrate, link
from dsp.bench.calibrate import TARGETS, calibrated_link, parse_rate, target_rate
from dsp.bench.link import EmulatedLink, list_namespaces, netns_available, tbf_rate
from dsp.bench.runner import BenchConfig
from dsp.launch import RankPool
from tests.bench import where_am_i
from tests.comm import _cases

_OK, _WHY = netns_available()
needs_netns = pytest.mark.skipif(not _OK, reason=f"no network namespaces here: {_WHY}")

# unique per test process: another run of this file at the same time must not see ours
PREFIX = f"dsptest{os.getpid()}"


def _ours(prefix: str) -> list:
    return [n for n in list_namespaces() if n.startswith(prefix + "-")]


@pytest.fixture(scope="module", autouse=True)
def _remove_leftovers_of_killed_test_runs():
    """Namespaces ``dsptest<pid>...`` of a test process that no longer exists."""
    for name in list_namespaces():
        m = re.match(r"dsptest(\d+)", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], check=False)
    yield


# ------------------------------------------------------------------------- pure functions
def test_rates_and_units():
    assert tbf_rate(1e6) == "8000000bit"
    assert tbf_rate(10e9) == "80000000000bit"
    assert parse_rate("25MB/s") == 25e6
    assert parse_rate("200mbit") == 25e6
    assert parse_rate("400 Mbit/s") == 50e6
    assert parse_rate("10Gb/s") == 1.25e9
    assert parse_rate("1MiB/s") == 2**20
    assert parse_rate(123.0) == 123.0
    for bad in ("25Mbps", "fast", "-3MB/s", "0MB/s", "3 furlongs"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_target_rate_keeps_the_compute_to_bandwidth_ratio():
    ib, nv = TARGETS["ib"], TARGETS["nvlink"]
    assert (ib.flops, ib.bandwidth, nv.bandwidth) == (989e12, 50e9, 450e9)
    # 100 GFLOP/s per rank against 989 TFLOP/s: the link is slowed by the same ~9890x
    assert target_rate("ib", 100e9) == pytest.approx(50e9 * 100e9 / 989e12)
    assert target_rate("nvlink", 100e9) / target_rate("ib", 100e9) == pytest.approx(9)
    assert target_rate("25MB/s", None) == 25e6  # a raw rate ignores the flops
    with pytest.raises(ValueError, match="target"):
        target_rate("infiniband", 1e9)


def test_rank_pool_checks_per_rank_lists():
    with pytest.raises(ValueError, match="netns"):
        RankPool(2, netns=["a"])
    with pytest.raises(ValueError, match="rank_env"):
        RankPool(2, rank_env=[{}, {}, {}])


# ------------------------------------------------------------------------------ namespaces
@needs_netns
def test_setup_and_teardown_leave_nothing():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with EmulatedLink(3, 5e6, prefix=PREFIX) as lk:
        names = set(_ours(PREFIX))
        assert names == set(lk.namespaces) | {lk.hub}
        assert lk.addresses == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
        qdisc = subprocess.run(
            ["tc", "-n", lk.namespaces[1], "qdisc", "show", "dev", lk.ifnames[1]],
            capture_output=True,
            text=True,
        ).stdout
        assert "tbf" in qdisc and "40Mbit" in qdisc, qdisc
        # the subnet exists only inside the namespaces: the root namespace has no route to it
        route = subprocess.run(["ip", "route", "show"], capture_output=True, text=True).stdout
        assert "10.213." not in route
        lk.set_rate(1e6)
        assert "8Mbit" in lk.qdisc_stats()[0]
    assert _ours(PREFIX) == []
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@needs_netns
def test_cleanup_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with EmulatedLink(2, 5e6, prefix=PREFIX):
            assert len(_ours(PREFIX)) == 3
            raise RuntimeError("boom")
    assert _ours(PREFIX) == []


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from dsp.bench.link import EmulatedLink
    with EmulatedLink(2, 5e6, prefix=sys.argv[1]):
        print("up", flush=True)
        time.sleep(60)
    """
)


def _holder(prefix: str) -> subprocess.Popen:
    """A process that builds a link and waits; returns once the link is up."""
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, prefix], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "up"
    return p


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cleanup_on_signal(sig):
    prefix = f"{PREFIX}sig{int(sig)}"
    p = _holder(prefix)
    assert len(_ours(prefix)) == 3
    p.send_signal(sig)
    p.wait(timeout=30)
    assert p.returncode != 0
    assert _ours(prefix) == []


@needs_netns
def test_stale_namespaces_of_a_killed_run_are_removed_at_start():
    prefix = f"{PREFIX}stale"
    p = _holder(prefix)
    p.kill()  # SIGKILL: no handler runs; the link's watchdog process deletes them
    p.wait(timeout=30)
    deadline = time.monotonic() + 15
    while _ours(prefix) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ours(prefix) == [], "the watchdog deleted the namespaces of the killed owner"
    # a dead run without a watchdog (killed with it): made by hand, a process still inside
    stale = {f"{prefix}-{p.pid}-0-r0", f"{prefix}-{p.pid}-0-hub", f"{prefix}-junk"}  # junk: no pid
    for name in stale:
        subprocess.run(["ip", "netns", "add", name], check=True)
    inside = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-{p.pid}-0-r0", "sleep", "300"])
    time.sleep(0.3)
    other = f"{prefix}x-1-0-r0"  # another prefix: left alone
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        with EmulatedLink(2, 5e6, prefix=prefix) as lk:
            assert set(lk.removed_stale) == stale
            assert set(_ours(prefix)) == set(lk.namespaces) | {lk.hub}
            assert inside.wait(timeout=10) == -signal.SIGKILL, "the process inside was killed"
        assert _ours(prefix) == [] and other in list_namespaces()
    finally:
        inside.kill()
        subprocess.run(["ip", "netns", "del", other], check=False)


@pytest.fixture(scope="module")
def netpool():
    """A 2-rank pool whose ranks live in their own namespaces on a rate-limited link."""
    with EmulatedLink(2, 1e9, prefix=f"{PREFIX}pool") as lk:
        with RankPool(2, timeout=30, **lk.pool_kwargs()) as pool:
            yield lk, pool
    assert _ours(f"{PREFIX}pool") == []


@needs_netns
def test_rank_pool_runs_inside_the_namespaces(netpool):
    lk, pool = netpool
    got = pool.run(where_am_i)
    want = [os.stat(os.path.join(link.NETNS_DIR, ns)).st_ino for ns in lk.namespaces]
    assert [g[0] for g in got] == want
    assert [g[1] for g in got] == lk.ifnames
    assert [g[2] for g in got] == [0, 1]
    assert want[0] != os.stat("/proc/self/ns/net").st_ino


@needs_netns
def test_switch_over_the_emulated_link(netpool):
    _, pool = netpool
    shapes = [(2, 4, 6, 8), (3, 5, 7, 2)]
    assert pool.run(_cases.switch_placement, shapes) == [2 * 12] * 2


@needs_netns
def test_rate_limit_is_effective(netpool):
    lk, pool = netpool
    nbytes = 4_000_000  # each rank sends 2 MB
    try:
        lk.set_rate(8e6)
        slow = calibrate.measure_alltoall_bandwidth(pool, nbytes)
        lk.set_rate(1e9)
        fast = calibrate.measure_alltoall_bandwidth(pool, nbytes)
    finally:
        lk.set_rate(1e9)
    # gloo's all-to-all is about half-duplex per pair over a slow link: ~0.5x with 2 ranks
    assert 0.3 * 8e6 < slow < 1.1 * 8e6, slow
    assert fast > 5 * slow, (fast, slow)


@needs_netns
def test_calibrated_link_hits_the_wanted_rate():
    t0 = time.monotonic()
    with calibrated_link(2, "20MB/s", prefix=f"{PREFIX}cal", verbose=False) as cal:
        assert cal.emulated and cal.wanted_rate == 20e6
        assert cal.cpu_flops > 1e9
        assert abs(cal.achieved_rate / cal.wanted_rate - 1) < 0.25, cal.summary()
        assert cal.configured_rate == cal.steps[-1][0] and 1 <= len(cal.steps) <= 2
        assert cal.pool.run(where_am_i)[1][1] == "veth1"
    assert _ours(f"{PREFIX}cal") == []
    assert time.monotonic() - t0 < 30


def test_calibrated_link_falls_back_to_loopback(monkeypatch, capsys):
    monkeypatch.setattr(calibrate, "netns_available", lambda: (False, "not root (test)"))
    small = BenchConfig(frames=4, height=8, width=8)
    with calibrated_link(2, "ib", workload=small, verbose=False) as cal:
        assert not cal.emulated and cal.configured_rate is None and cal.link is None
        assert cal.reason == "not root (test)"
        m = cal.match  # workload-matched: DSP's bytes over its compute at the target's ratio
        assert cal.wanted_rate == pytest.approx(
            m["bench_bytes"] / (m["target_ratio"] * m["bench_compute_s"])
        )
        assert m["peak_rate"] == target_rate("ib", cal.cpu_flops)
        assert cal.achieved_rate > 0 and m["bench_ratio"] < m["target_ratio"]  # loopback: fast
    err = capsys.readouterr().err
    assert "not root (test)" in err and "loopback" in err and len(err.strip().splitlines()) == 1
