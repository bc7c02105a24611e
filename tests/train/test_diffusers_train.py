"""`dsp train --model diffusers:latte`: diffusers' Latte, unchanged, trained with DSP x DP.

The loss is fp32 (the trainer's flow loss), the mean of 8192 squared errors; an N-rank run
differs from one process only in the summation order of sharded matmuls and attentions
(about 1e-7 relative per element), so the first step's loss agrees far inside 1e-6 (in
practice to the bit).
"""

import json
import math

import pytest

pytest.importorskip("diffusers")

from dsp.cli import main  # noqa: E402
from dsp.train import TrainConfig, train  # noqa: E402
from tests.train import _diffusers_cases  # noqa: E402


def _one_process_first_loss():
    return train(TrainConfig(**_diffusers_cases.BASE)).losses[0]


def test_cli_trains_latte_on_two_ranks_checkpoints_and_resumes(tmp_path, capsys):
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.json"
    args = ["train", "--model", "diffusers:latte", "--warmup", "1", "--no-progress"]
    args += ["--ckpt-dir", str(ckpt)]
    assert main(args + ["--world-size", "2", "--steps", "1", "--log-json", str(log)]) == 0
    out = capsys.readouterr().out
    assert "dp=1 x sp=2" in out and "dsp / ddp" in out and "0 -> 1" in out
    assert (ckpt / "latest").read_text().strip() == "step_00000001"
    (loss,) = json.loads(log.read_text())["losses"]
    assert math.isfinite(loss)
    assert abs(loss - _one_process_first_loss()) <= 1e-6
    # resume on another layout (one process): the model and data keys match
    assert main(args + ["--steps", "2", "--resume"]) == 0
    assert "1 -> 2" in capsys.readouterr().out
    assert (ckpt / "latest").read_text().strip() == "step_00000002"


def test_dsp_shards_latte_and_its_losses_equal_one_process(pools):
    reference = train(TrainConfig(**{**_diffusers_cases.BASE, "steps": 2})).losses
    for layout in ({"sp": 2}, {"dp": 2, "sp": 1}):
        results = pools.run(2, _diffusers_cases.run, steps=2, **layout)
        for r in results:
            assert r["layout"]["sp"] == layout["sp"] and r["layout"]["strategy"] == "dsp"
            assert len(r["losses"]) == 2
            assert all(abs(a - b) <= 1e-6 for a, b in zip(r["losses"], reference))
            if layout["sp"] == 2:  # DSP's switches between frame and patch shards
                assert "all_to_all" in r["ops"] and r["sent"] > 0


def test_what_cannot_train_is_refused_before_any_rank(capsys):
    base = ["train", "--model", "diffusers:latte", "--world-size", "2"]
    assert main(base + ["--data-parallel", "fsdp"]) == 2
    assert "--data-parallel fsdp is not supported for diffusers:latte" in capsys.readouterr().err
    assert main(base + ["--activation-checkpointing"]) == 2
    assert "--activation-checkpointing is not supported" in capsys.readouterr().err
    assert main(base + ["--plan", "hand"]) == 2
    assert "--plan hand: diffusers:latte is planned per input shapes" in capsys.readouterr().err
    assert main(["train", "--model", "diffusers:wan"]) == 2
    assert "dsp train builds diffusers:latte" in capsys.readouterr().err
    assert main(["train", "--model", "diffusers:sora"]) == 2
    assert "unknown diffusers model 'diffusers:sora'" in capsys.readouterr().err


def test_dsp_sample_reads_a_diffusers_checkpoint_on_two_ranks(tmp_path):
    import torch

    ckpt = tmp_path / "ckpt"
    args = ["train", "--model", "diffusers:latte", "--steps", "1", "--no-progress"]
    assert main(args + ["--ckpt-dir", str(ckpt)]) == 0
    sample = ["sample", "--checkpoint", str(ckpt), "--steps", "2", "--out", str(tmp_path / "v.gif")]
    for world in (2, 1):
        out = str(tmp_path / f"s{world}.pt")
        assert main(sample + ["--world-size", str(world), "--save-tensor", out]) == 0
    two, one = (torch.load(tmp_path / f"s{w}.pt")["latents"] for w in (2, 1))
    torch.testing.assert_close(two, one, atol=1e-5, rtol=0)  # fp32
