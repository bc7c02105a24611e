"""Bad flags fail before any rank starts, in one line that names the flag and the fix; the
timeout reaches every process group, DeviceMesh dimensions included."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from dsp.cli import main
from dsp.launch import RankPool

from . import _jobs

CASES = [
    (["train", "--sp", "2", "--frames", "1"], "--frames 1 gives 1 patched frame(s), fewer "
     "than sp=2 ranks"),
    (["train", "--sp", "3", "--dp", "2", "--frames", "2"], "--frames 2 gives 2 patched"),
    (["train", "--sp", "-2"], "--sp must be >= 1, got -2"),
    (["train", "--dp", "0", "--sp", "2"], "--dp must be >= 1, got 0"),
    (["train", "--world-size", "1000"], "--world-size 1000: this machine"),
    (["train", "--timeout", "0"], "--timeout must be a positive number of seconds"),
    (["train", "--threads", "0"], "--threads must be >= 1"),
    (["sample", "--world-size", "4", "--frames-from-model"], None),  # argparse: exit 2
    (["sample", "--world-size", "1000"], "--world-size 1000: this machine"),
    (["sample", "--world-size", "9", "--force"], "--frames 8 gives 8 patched frame(s), fewer "
     "than sp=9"),
    (["bench", "--link", "nonsense"], "--link 'nonsense': expected none"),
    (["bench", "--world-size", "1000"], "--world-size 1000: this machine"),
    (["bench", "--world-size", "0"], "--world-size values must be >= 1"),
    (["bench", "--world-size", "2", "--frames", "1"], "--frames 1 gives 1 patched frame(s) "
     "for stdit-tiny, fewer than --world-size 2"),
    (["demo", "--world-size", "1"], "--world-size must be >= 2, got 1"),
    (["demo", "--link", "fast"], "cannot parse rate 'fast'"),
]  # fmt: skip


@pytest.mark.parametrize("args, want", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_refused_up_front_in_one_line(args, want, capsys):
    start = time.monotonic()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and took < 10, (took, err)
    if want is not None:
        assert err.count("\n") == 1 and want in err, err
        assert err.startswith(f"dsp {args[0]}: error: --"), err


def test_debug_shows_the_traceback(capsys):
    assert main(["--debug", "train", "--sp", "-2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("--sp must be >= 1, got -2")


def test_every_group_gets_the_timeout(monkeypatch):
    """DSP_TIMEOUT reaches the world group, the (dp, sp) DeviceMesh dimensions (which torch
    creates with gloo's 30-minute default) and the groups DDP and the strategy made."""
    monkeypatch.setenv("DSP_TIMEOUT", "7")
    with RankPool(4) as pool:
        assert pool.timeout == 7
        out = pool.run(_jobs.group_timeouts, 2, 2)
    for got in out:
        assert got["world"] == timedelta(seconds=7)
        assert got["dp"] == got["sp"] == timedelta(seconds=7)
        assert got["all"] and set(got["all"]) == {timedelta(seconds=3)}, got


@pytest.mark.parametrize("command", ["train", "sample", "bench", "demo"])
def test_help_lists_the_failure_flags(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--timeout SECONDS", "--force", "--debug", "DSP_TIMEOUT", "timeout + 30 s"):
        assert flag in out, (command, flag)
    if command == "train":
        assert "--resume [{auto,required}]" in out
