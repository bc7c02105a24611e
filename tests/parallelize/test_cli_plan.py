"""``dsp plan``: the table, the total, JSON output and the dry run."""

import argparse
import json

import pytest

from dsp.cli import plan as plan_cli
from dsp.parallelize import Plan


def main(argv):
    """``dsp plan ...`` through the subcommand's own parser."""
    parser = argparse.ArgumentParser(prog="dsp")
    plan_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_registered_in_the_dsp_command():
    from dsp.cli.main import build_parser

    args = build_parser().parse_args(["plan", "--model", "latte-tiny"])
    assert args.func is plan_cli.run


@pytest.mark.parametrize(
    "argv,ratio",
    [
        (["--model", "stdit-tiny", "--frames", "16", "--height", "32", "--width", "32"], "1.000"),
        (["--model", "latte-tiny", "--frames", "16", "--height", "32", "--width", "32"], "0.833"),
        (["--model", "axial-tiny", "--frames", "8", "--height", "16", "--width", "24"], "1.000"),
        (["--model", "evoformer-tiny", "--msa", "16", "--residues", "24"], "0.9"),
    ],
)
def test_plan_prints_table_bytes_and_total(capsys, argv, ratio):
    assert main(["plan", "--world-size", "4", *argv]) == 0
    out = capsys.readouterr().out
    assert "computes over" in out and "runs on" in out and "bytes" in out
    assert "total:" in out and f"this plan sends {ratio}" in out


def test_json_and_dry_run(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert (
        main(["plan", "--model", "evoformer-tiny", "--world-size", "3", "--json", str(path)]) == 0
    )
    plan = Plan.from_json(path.read_text())
    assert {s.name for s in plan.streams} == {"msa", "pair"}
    argv = ["plan", "--model", "evoformer-tiny", "--plan", str(path), "--dry-run"]
    assert main([*argv, "--world-size", "3"]) == 0
    assert "dry run: OK" in capsys.readouterr().out
    assert main([*argv, "--world-size", "128"]) == 1  # 64 residues cannot go over 128 ranks
    assert "shorter than the world size 128" in capsys.readouterr().err
    data = json.loads(path.read_text())
    data["stages"] = [s for s in data["stages"] if s["module"] != "blocks.1.tri_in.left"]
    path.write_text(json.dumps(data))
    assert main([*argv, "--world-size", "3"]) == 1
    err = capsys.readouterr().err
    assert "dry run failed" in err and "blocks.1.tri_in.left" in err


def test_even_only_without_a_choice(capsys):
    argv = ["plan", "--model", "axial-tiny", "--world-size", "3", "--frames", "16", "--even-only"]
    assert main(argv) == 1
    assert "even_only" in capsys.readouterr().err
