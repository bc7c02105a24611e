"""The `dsp` command: demo --quick (the README's job, CI-sized) and a tiny bench sweep."""

import json

from dsp.cli import main

SCHEMA = {
    "model",
    "strategy",
    "world_size",
    "frames",
    "height",
    "width",
    "batch",
    "mode",
    "step_time_s",
    "samples_per_s",
    "tokens_per_s",
    "bytes_sent_forward",
    "bytes_sent_backward",
    "saved_activation_bytes",
    "peak_rss_bytes",
    "error",
}


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "equal" in out and "DIFFERENT" not in out
    data = json.loads((tmp_path / "report" / "demo.json").read_text())
    assert {r["strategy"] for r in data["results"]} >= {"dsp", "ulysses", "ring", "megatron_sp"}
    assert (tmp_path / "report" / "demo.md").exists()
    assert (tmp_path / "report" / "throughput.png").exists()


def test_bench_writes_schema_and_records_errors(tmp_path):
    path = tmp_path / "b.json"
    rc = main(
        [
            "bench",
            "--strategy",
            "dsp,megatron_sp",
            "--world-size",
            "2,3",
            "--frames",
            "4",
            "--height",
            "8",
            "--width",
            "8",
            "--heads",
            "2",
            "--hidden",
            "16",
            "--repeats",
            "1",
            "--json",
            str(path),
        ]
    )
    data = json.loads(path.read_text())
    assert {"date", "host", "torch", "dsp", "link", "config"} <= set(data["meta"])
    rows = data["results"]
    assert len(rows) == 4 and all(SCHEMA <= set(r) for r in rows)
    # megatron_sp cannot split 2 heads over 3 ranks: recorded, and the sweep went on
    bad = [r for r in rows if r["error"]]
    assert [(r["strategy"], r["world_size"]) for r in bad] == [("megatron_sp", 3)]
    assert "fewer than the 3 ranks" in bad[0]["error"]
    assert rc == 1
    good = [r for r in rows if not r["error"]]
    assert all(r["bytes_sent_forward"] > 0 and r["step_time_s"]["median"] > 0 for r in good)


def test_bench_progress_prints_errors_verbatim(capsys):
    """gloo's errors quote "[file.cc:129]", which rich would parse as markup and crash on."""
    from dsp.cli.bench import progress

    bar, tick = progress(1)
    row = dict(model="m", strategy="dsp", world_size=2, frames=4, height=8, width=8)
    row.update(step_time_s=None, error="[/x/unbound_buffer.cc:129] Timed out")
    if bar is not None:
        with bar:
            tick(row)
    else:
        tick(row)
    assert "[/x/unbound_buffer.cc:129] Timed out" in capsys.readouterr().out
