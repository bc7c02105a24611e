"""`dsp bench --model diffusers:...`: diffusers' tiny video models in the sweep, 2 ranks."""

import json

import pytest

pytest.importorskip("diffusers")

from dsp.cli import main  # noqa: E402


def test_bench_diffusers_models_records_bytes_and_why_a_strategy_does_not_apply(tmp_path):
    path = tmp_path / "b.json"
    sizes = ["--frames", "4", "--height", "8", "--width", "8", "--world-size", "2"]
    rc = main(
        ["bench", "--model", "diffusers:latte,diffusers:animatediff,diffusers:svd"]
        + ["--strategy", "dsp,ulysses,megatron_sp", "--repeats", "1", "--json", str(path)]
        + sizes
    )
    assert rc == 1  # the strategies that do not apply are recorded as errors
    rows = {(r["model"], r["strategy"]): r for r in json.loads(path.read_text())["results"]}
    assert len(rows) == 9
    latte, latte_uly = rows["diffusers:latte", "dsp"], rows["diffusers:latte", "ulysses"]
    for r in (latte, latte_uly, rows["diffusers:animatediff", "dsp"], rows["diffusers:svd", "dsp"]):
        assert r["error"] is None and r["step_time_s"]["median"] > 0
        assert r["bytes_sent_forward"] > 0 and r["bytes_sent_backward"] > 0
    # Latte: DSP switches between frame and patch shards, Ulysses to heads and back: half
    assert 2 * latte["bytes_sent_forward"] == latte_uly["bytes_sent_forward"]
    assert latte["bytes_sent_backward"] < latte_uly["bytes_sent_backward"]
    for model in ("diffusers:latte", "diffusers:animatediff", "diffusers:svd"):
        assert "megatron_sp needs column/row weight styles" in rows[model, "megatron_sp"]["error"]
    assert "motion_modules" in rows["diffusers:animatediff", "ulysses"]["error"]
    assert "temporal_res_block" in rows["diffusers:svd", "ulysses"]["error"]
    assert (tmp_path / "b.md").exists()


def test_bench_unknown_diffusers_model_is_refused_before_any_rank(capsys):
    assert main(["bench", "--model", "diffusers:sora", "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "unknown diffusers model 'diffusers:sora'" in err and "diffusers:latte" in err
