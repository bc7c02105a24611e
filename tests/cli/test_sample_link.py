"""``dsp sample --link``: the flag, its errors, the calibration's workload, and sampling over
loopback and over an emulated link equal to one process; the latency benchmark's smoke run."""

import json
import os
import subprocess
import sys

import pytest
import torch

import dsp.bench.link
from dsp.bench.link import netns_available
from dsp.cli import main
from dsp.cli.bench import configs_from_args
from dsp.cli.main import build_parser
from dsp.cli.sample import sample_workload
from dsp.sample import SampleConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _latents(tmp_path, name, *flags):
    out = tmp_path / f"{name}.pt"
    argv = ["sample", "--steps", "2", "--frames", "4", "--height", "8", "--width", "8",
            "--out", str(tmp_path / f"{name}.gif"), "--save-tensor", str(out),
            "--json", str(tmp_path / f"{name}.json"), *flags]  # fmt: skip
    assert main(argv) == 0
    return torch.load(out)["latents"], json.loads((tmp_path / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _latents(tmp_path_factory.mktemp("one"), "one")[0]


def test_link_flag_parses():
    parser = build_parser()
    assert parser.parse_args(["sample"]).link == "loopback"
    for link in ("ib", "nvlink", "loopback", "25MB/s"):
        assert parser.parse_args(["sample", "--link", link]).link == link


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--world-size", "2", "--link", "fast"], "expected loopback, nvlink, ib or a rate"),
        (["--link", "ib"], "needs --world-size >= 2"),
        (["--world-size", "2", "--link", "ib", "--set", "caption_channels=8"],
         "cannot stand for overrides ['caption_channels']"),
        (["--diffusers", "x", "--link", "ib"], "--link ib: for dsp's own models"),
    ],
)  # fmt: skip
def test_link_errors(flags, message, capsys):
    assert main(["sample", *flags]) == 2
    assert message in capsys.readouterr().err


def test_link_without_namespaces_says_why(monkeypatch, capsys):
    why = "not root (euid 1000); network namespaces and tc need root"
    monkeypatch.setattr(dsp.bench.link, "netns_available", lambda: (False, why))
    assert main(["sample", "--world-size", "2", "--link", "ib", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--link ib: cannot emulate a link here: {why}" in err


def test_link_is_calibrated_as_dsp_bench_infer():
    """The workload --link calibrates for is the one of dsp bench --mode infer --link ib at the
    same model and latent size (dsp sample's sizes are pixels: latent = half)."""
    cfg = SampleConfig(model_overrides={"hidden_size": 256, "num_heads": 8, "depth": 2},
                       frames=16, height=64, width=64)  # fmt: skip
    bench_args = build_parser().parse_args(
        ["bench", "--mode", "infer", "--link", "ib", "--strategy", "dsp", "--world-size", "2",
         "--frames", "16", "--height", "32", "--width", "32", "--hidden", "256", "--heads",
         "8", "--depth", "2"]
    )  # fmt: skip
    assert [sample_workload(cfg, 2)] == configs_from_args(bench_args)


def test_loopback_equals_one_process(tmp_path, one_process):
    latents, report = _latents(tmp_path, "two", "--world-size", "2", "--link", "loopback")
    torch.testing.assert_close(latents, one_process, rtol=0, atol=1e-5)
    assert "link" not in report and report["layout"]["sp"] == 2


@pytest.mark.skipif(not netns_available()[0], reason=f"no network namespaces: "
                    f"{netns_available()[1]}")  # fmt: skip
def test_emulated_rate_equals_one_process(tmp_path, one_process):
    latents, report = _latents(tmp_path, "link", "--world-size", "2", "--link", "200MB/s")
    torch.testing.assert_close(latents, one_process, rtol=0, atol=1e-5)
    assert report["link"]["emulated"] and report["link"]["configured_bytes_per_s"] > 0
    assert report["ranks"][0]["bytes_per_step"] > 0


def test_sample_latency_quick(tmp_path):
    """benchmarks/sample_latency.py --quick (on loopback: the emulated link is tested above)."""
    out = tmp_path / "q.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "sample_latency.py"), "--quick",
         "--link", "loopback", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["world_size"]) for r in rows] == [
        ("one process", 1), ("ulysses", 2), ("dsp", 2)
    ]  # fmt: skip
    assert all(r["max_latent_diff_vs_one_process"] <= 1e-5 for r in rows)
    assert rows[0]["speedup_vs_one_process"] == 1.0 and "dsp_over_ulysses" in rows[2]
    assert (tmp_path / "q.md").read_text().startswith("# Sampling latency")
    assert (tmp_path / "q.png").stat().st_size > 0 or "matplotlib" in proc.stderr


def test_overlapped_slices_equal_one_process(tmp_path, one_process):
    """--chunks 2, and --chunks auto for a described cluster on which slicing pays (a slow
    link, compute as slow), on 2 ranks: the temporal stages run in 2 slices."""
    from tests.parallelize._cases import SLOW_LINK

    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(SLOW_LINK))
    for flags in (["--chunks", "2"], ["--chunks", "auto", "--cluster", str(slow)]):
        latents, report = _latents(tmp_path, "chunks", "--world-size", "2", *flags)
        torch.testing.assert_close(latents, one_process, rtol=0, atol=1e-5)
        assert report["layout"]["chunks"] == [1, 2], report["layout"]


@pytest.mark.skipif(not netns_available()[0], reason="network namespaces need root and ip")
def test_auto_slices_plan_for_the_emulated_link(tmp_path, one_process):
    latents, report = _latents(
        tmp_path, "auto", "--world-size", "2", "--link", "200MB/s", "--chunks", "auto"
    )
    torch.testing.assert_close(latents, one_process, rtol=0, atol=1e-5)
    assert report["link"]["emulated"] and report["layout"]["chunks"]  # planned, then ran


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--world-size", "2", "--chunks", "auto"], "give --cluster"),
        (["--world-size", "2", "--chunks", "2", "--strategy", "ulysses"], "ulysses has none"),
        (
            ["--world-size", "2", "--link", "ib", "--chunks", "auto", "--strategy", "ulysses"],
            "ulysses has none",
        ),
    ],
)
def test_chunk_flag_errors(flags, message, capsys):
    assert main(["sample", *flags]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--chunks", "x"])
    assert "'x' is not a slice count: a whole number >= 1 or auto" in capsys.readouterr().err
