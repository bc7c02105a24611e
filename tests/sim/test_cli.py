"""``dsp simulate`` end to end: table, JSON with dsp bench's field names, plots, search."""

import json

from dsp.cli.main import main


def test_simulate_writes_records_and_plots(tmp_path, capsys):
    out = tmp_path / "sim.json"
    argv = ["simulate", "--model", "stdit-xl/2", "--strategy", "dsp,ulysses", "--frames", "64,128"]
    argv += ["--gpus", "8,16", "--cluster", "2x8xh100-ib", "--activation-checkpointing"]
    assert main(argv + ["--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 2 * 2 * 2
    for key in ("step_time_s", "samples_per_s", "tokens_per_s", "bytes_sent_forward", "fits"):
        assert all(key in r for r in rows)
    assert (tmp_path / "sim_vs_gpus.png").exists() and (tmp_path / "sim_vs_frames.png").exists()
    assert "| stdit-xl/2 | dsp | 16 |" in capsys.readouterr().out


def test_simulate_search_names_the_mesh(capsys):
    argv = ["simulate", "--search", "--gpus", "16", "--frames", "512", "--cluster", "2x8xh100-ib"]
    assert main(argv + ["--activation-checkpointing", "--strategy", "dsp"]) == 0
    assert "best for stdit-xl/2 T=512 on 16 GPUs: dsp sp=" in capsys.readouterr().out


def test_simulate_costs_every_model_and_says_what_cannot_run(capsys):
    """The Evoformer (sized by --msa/--residues) under dsp; Ulysses on it: the engine's own
    error in the table, exit status 1."""
    argv = ["simulate", "--model", "evoformer-tiny", "--strategy", "dsp,ulysses", "--gpus", "2"]
    argv += ["--msa", "6", "--residues", "10", "--cluster", "8xh100-nvlink"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "| evoformer-tiny | dsp | 2 | 2 x 1 | M=6 R=10 |" in out
    assert "error: heads: module 'blocks.0.col_attn'" in out and "(use --strategy dsp)" in out
