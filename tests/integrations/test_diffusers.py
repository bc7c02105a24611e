"""diffusers' video models, unchanged, under ``dsp.integrations.diffusers.parallelize``.

Tiny random configs (tests/integrations/_diffusers.py), no downloads, fp64, B = 2, 5 frames of
4 x 3 patches: outputs and every parameter gradient equal one process, and the bytes
measured equal the dry run, for the planner's plan and the baselines; pipelines return one
process's frames on every rank.
"""

import re

import pytest

pytest.importorskip("diffusers")

from tests.integrations import _diffusers  # noqa: E402


def _sent(results):
    return sum(r["sent"] for r in results)


@pytest.mark.parametrize("n", [2, 3])
def test_latte_planner_plan_equals_one_process(pools, n):
    results = pools.run(n, _diffusers.equality, "latte")
    assert _sent(results) == results[0]["predicted"] > 0
    kinds = results[0]["kinds"]
    assert ("local", "") in kinds  # temp_pos_embed sliced with the frames
    assert {k for k, _ in kinds} == {"compute", "local", "relayout"}
    assert results[0]["grads"] > 50
    assert not results[0]["warnings"]


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_latte_baselines_equal_one_process_and_send_more(pools, strategy):
    results = pools.run(2, _diffusers.equality, "latte", strategy)
    dsp_results = pools.run(2, _diffusers.equality, "latte")
    assert _sent(results) == results[0]["predicted"] > _sent(dsp_results)


def test_latte_usp_equals_one_process(pools):
    # 4 ranks: Ulysses over rows of 2 (2 heads) x ring across the 2 rows
    results = pools.run(4, _diffusers.equality, "latte", "usp", ulysses_degree=2)
    assert _sent(results) == results[0]["predicted"] > 0
    assert {k for k, _ in results[0]["kinds"]} == {"usp", "local"}


@pytest.mark.parametrize("n", [2, 3])
def test_wan_heads_plan_equals_one_process(pools, n):
    results = pools.run(n, _diffusers.equality, "wan")
    assert _sent(results) == results[0]["predicted"] > 0
    assert {k for k, _ in results[0]["kinds"]} == {"heads"}
    if n == 3:  # 3 heads and 12 patches over 3 ranks: even, Ulysses' formula holds exactly
        numel, itemsize, attentions = 2 * 60 * 24, 8, 2  # q of (B, F*S, C), fp64, 2 blocks
        per_attention = 4 * (n - 1) * numel * itemsize // n  # all ranks, forward
        gather = 4 * numel * (n - 1)  # the exit: norm_out's input, cast to fp32 by Wan
        assert _sent(results) == 2 * attentions * per_attention + gather  # forward + backward


def test_wan_ring_equals_one_process(pools):
    results = pools.run(2, _diffusers.equality, "wan", "ring")
    assert _sent(results) == results[0]["predicted"] > 0


@pytest.mark.parametrize("n", [2, 3])
def test_animatediff_frames_sharded_through_the_unet_equal_one_process(pools, n):
    results = pools.run(n, _diffusers.equality, "animatediff")
    assert _sent(results) == results[0]["predicted"] > 0
    kinds = results[0]["kinds"]
    # convolutions, ResNets and spatial transformers run on frame shards (per-frame
    # timestep and text sliced at each block); motion modules need every frame: they run on
    # shards of their own rows or columns, GroupNorm statistics summed over the ranks
    assert {k for k, m in kinds if "motion_modules" in m} == {"compute"}
    assert {k for k, m in kinds if "motion_modules" not in m} == {"local"}
    assert "whole" not in results[0]["plan"]


def test_wan_side_by_side_with_diffusers_own_context_parallelism(pools):
    results = pools.run(3, _diffusers.versus_diffusers)
    (ours, _), (theirs, _) = results[0]["dsp"], results[0]["diffusers"]
    # the same four all-to-alls per attention; the exits differ: DSP gathers norm_out's input
    # (fp32, 24 channels), diffusers proj_out's output (fp64, 16 channels)
    tokens, n = 2 * 60, 3
    assert theirs - ours == tokens * (16 * 8 - 24 * 4) * (n - 1) // n


@pytest.mark.parametrize("name", ["latte", "animatediff", "svd"])
def test_diffusers_own_context_parallelism_does_not_apply_to_factorized_models(pools, name):
    (error, _) = pools.run(2, _diffusers.diffusers_own, name)
    assert "`cp_plan` must be provided" in error


def test_more_ranks_than_frames_warns_once_and_equals_one_process(pools):
    results = pools.run(3, _diffusers.equality, "latte", frames=2)
    for r in results:
        assert len(r["warnings"]) == 1 and "2 frames (F) on 3 ranks" in r["warnings"][0]
    assert _sent(results) == results[0]["predicted"]


@pytest.mark.parametrize("name", ["latte", "wan", "animatediff"])
def test_pipeline_returns_one_process_frames_on_every_rank(pools, name):
    results = pools.run(3 if name == "wan" else 2, _diffusers.pipeline_frames, name)
    assert all(r["sent"] > 0 for r in results)


def test_pipeline_from_local_weights(pools):
    results = pools.run(2, _diffusers.pipeline_frames, "latte", "dsp", False, True)
    assert all(r["sent"] > 0 for r in results)


def test_cfg_parallel_pipeline_returns_one_process_frames(pools):
    # 4 ranks: the unconditional and conditional halves of the batch on 2 + 2 ranks, DSP
    # inside each half, the halves' outputs all-gathered over the pairs across them
    results = pools.run(4, _diffusers.pipeline_frames, "latte", "dsp", True)
    assert all(r["ops"] == ["all_gather", "all_to_all"] for r in results)


def test_example_inputs_plan_at_once_and_remove_restores_the_model(pools):
    for r in pools.run(2, _diffusers.planned_ahead_then_removed):
        assert r["planned"] and r["sent"] > 0
        assert r["after"] == 0 and r["attrs"] == [] and r["hooks"] == 0


def test_bad_inputs_fail_on_every_rank_before_any_collective(pools):
    for r in pools.run(2, _diffusers.bad_inputs):
        assert r["sent"] == 0
        assert re.search(
            r"no declarations for Linear; declared diffusers classes: "
            r"LatteTransformer3DModel, WanTransformer3DModel, UNetMotionModel.*docs/diffusers.md",
            r["class"],
        )
        assert re.search(
            r"_Pipeline has no transformer or unet.*\['scheduler', 'vae'\]", r["pipeline"]
        )
        assert re.search(r"dtype torch.float8_e4m3fn, which gloo cannot reduce", r["dtype"])
        assert "megatron_sp needs column/row weight styles" in r["strategy"]
        assert "already parallelized" in r["twice"]


def test_importing_dsp_does_not_import_diffusers():
    import subprocess
    import sys

    code = "import sys, dsp, dsp.integrations.diffusers; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_readme_and_docs_quote_the_committed_bytes():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    results = (root / "benchmarks/results/diffusers_bytes_2026-11-28.md").read_text()
    rows = {r.split("|")[1].strip(): r.split("|") for r in results.splitlines() if "| 4 |" in r}
    readme, doc = (root / "README.md").read_text(), (root / "docs/diffusers.md").read_text()
    for name, cls in (("latte", "LatteTransformer3DModel"), ("wan", "WanTransformer3DModel")):
        dsp_mib, uly_mib, _, dsp_gib, uly_gib = (float(v) for v in rows[name][3:8])
        line = next(r for r in readme.splitlines() if r.startswith(f"| `{cls}`"))
        assert f"{dsp_mib:.1f} / {uly_mib:.1f} MiB" in line
        assert f"{dsp_gib:.1f} vs {uly_gib:.1f} GiB" in line
        assert f"{dsp_mib:.2f} MiB | {uly_mib:.2f} MiB" in doc


def test_the_example_script_runs_on_two_ranks_and_equals_one_process():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = root / "docs" / "examples" / "diffusers_latte.py"
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=root
    )
    assert run.returncode == 0, run.stderr
    assert "equal to one process: yes" in run.stdout and "rank 1: sent" in run.stdout


@pytest.mark.parametrize("checkpoint", [False, True])
def test_latte_overlapped_slices_chosen_by_the_planner(pools, checkpoint):
    """diffusers' Latte, unchanged: chunks="auto" on a slow described link slices its
    temporal stages; exact, bytes == dry run, also under diffusers' own per-block gradient
    checkpointing (the recompute runs the sliced stages again)."""
    from tests.parallelize._cases import SLOW_LINK

    results = pools.run(
        2, _diffusers.equality, "latte", "dsp", 1e-9, checkpoint=checkpoint, chunks="auto",
        cluster=SLOW_LINK,
    )  # fmt: skip
    assert "(2 chunks)" in results[0]["plan"], results[0]["plan"]
    assert _sent(results) >= results[0]["predicted"] > 0
    if not checkpoint:  # the recompute sends the sliced stages' switches once more
        assert _sent(results) == results[0]["predicted"]
