"""`dsp train` on the command line: a run, its summary, resume, and errors with the numbers."""

import json

from dsp.cli import main


def test_train_runs_saves_and_resumes(tmp_path, capsys):
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.json"
    args = ["train", "--steps", "2", "--warmup", "1", "--no-progress", "--ckpt-dir", str(ckpt)]
    assert main(args + ["--log-json", str(log)]) == 0
    out = capsys.readouterr().out
    assert "dp=1 x sp=1" in out and "0 -> 2" in out and "step_00000002" in out
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert (
        main(["train", "--steps", "3", "--no-progress", "--ckpt-dir", str(ckpt), "--resume"]) == 0
    )
    assert "2 -> 3" in capsys.readouterr().out
    assert len(json.loads(log.read_text())["losses"]) == 2


def test_train_progress_bar_or_lines(tmp_path, capsys):
    assert main(["train", "--steps", "2", "--set", "depth=1", "--log-every", "1"]) == 0
    assert "loss" in capsys.readouterr().out


def test_train_flag_errors(capsys):
    assert main(["train", "--dp", "2", "--sp", "2", "--world-size", "2"]) == 2
    assert "dp=2 x sp=2 = 4 ranks, but the world size is 2" in capsys.readouterr().err
    assert main(["train", "--sp", "3", "--world-size", "4"]) == 2
    assert "world size 4 is not divisible by sp=3" in capsys.readouterr().err
    assert main(["train", "--strategy", "megatron_sp"]) == 2
    assert "tensor parallelism" in capsys.readouterr().err
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --ckpt-dir" in capsys.readouterr().err
    assert main(["train", "--frames", "8", "--height", "10", "--steps", "1"]) == 2
    assert "latent height 5" in capsys.readouterr().err
    assert main(["train", "--set", "depht=2", "--steps", "1"]) == 2
    assert "unknown config fields ['depht']" in capsys.readouterr().err


def test_train_with_overlapped_slices_equals_blocking(tmp_path, capsys):
    """--chunks 2 on sp = 2, with and without activation checkpointing: the same losses as
    blocking switches (fp32 rounding)."""
    losses = {}
    ckpt = ["--chunks", "2", "--activation-checkpointing"]
    for name, extra in (("blocking", []), ("chunks", ["--chunks", "2"]), ("ckpt", ckpt)):
        log = tmp_path / f"{name}.json"
        argv = ["train", "--sp", "2", "--world-size", "2", "--steps", "2", "--no-progress",
                "--frames", "8", "--log-json", str(log), *extra]  # fmt: skip
        assert main(argv) == 0
        out = json.loads(log.read_text())
        losses[name] = out["losses"]
        assert out["layout"]["chunks"] == ([1] if name == "blocking" else [1, 2]), out["layout"]
    assert len(losses["chunks"]) == len(losses["ckpt"]) == 2
    for a, c, b in zip(losses["chunks"], losses["ckpt"], losses["blocking"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)) and abs(c - b) <= 1e-5 * max(1.0, abs(b))


def test_train_chunk_flag_errors(capsys):
    assert main(["train", "--chunks", "auto", "--sp", "2", "--world-size", "2"]) == 2
    assert "give --cluster" in capsys.readouterr().err
    assert main(["train", "--chunks", "2", "--strategy", "ulysses"]) == 2
    assert "--strategy ulysses has none" in capsys.readouterr().err
    assert main(["train", "--cluster", "8xh100-nvlink"]) == 2
    assert "--cluster describes the machine for --chunks auto" in capsys.readouterr().err
    assert main(["train", "--chunks", "auto", "--cluster", "9xfoo-ib"]) == 2
    assert "unknown" in capsys.readouterr().err
