"""DSP on diffusers' Stable Video Diffusion UNet, unchanged (tiny random config, fp64)."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from tests.integrations import _diffusers, _svd  # noqa: E402


def _part(module: str) -> str:
    for part in ("temporal_res_block", "transformer_blocks", "attentions"):
        if part in module:
            return part
    return module


def _sent(results):
    return sum(r["sent"] for r in results)


@pytest.mark.parametrize("n", [2, 3])
def test_svd_unet_equals_one_process_with_frames_and_rows_sharded(pools, n):
    results = pools.run(n, _diffusers.equality, "svd")
    assert _sent(results) == results[0]["predicted"] > 0
    assert results[0]["grads"] > 50
    kinds = {(k, _part(m)) for k, m in results[0]["kinds"] if k != "local"}
    # temporal ResNets on their own rows or columns (GroupNorm over frames and rows, summed
    # over ranks); the spatio-temporal transformers need every frame (they number them) and
    # run on their rows, their spatial blocks switch to frames inside them: nothing whole
    assert kinds == {
        ("compute", "temporal_res_block"),
        ("compute", "attentions"),
        ("compute", "transformer_blocks"),
    }


def test_svd_unet_with_diffusers_gradient_checkpointing_equals_one_process(pools):
    # diffusers checkpoints each spatial block inside a spatio-temporal transformer: their
    # recomputation in backward switches from the transformer's rows again, at the sizes it
    # used in the forward (not those of the last transformer the forward ran)
    results = pools.run(2, _diffusers.equality, "svd", checkpoint=True)
    assert results[0]["grads"] > 50


@pytest.mark.parametrize("n", [2, 3])
def test_svd_pipeline_returns_one_process_latents_on_every_rank(pools, n):
    results = pools.run(n, _svd.pipeline_frames)
    assert {r["shape"] for r in results} == {(1, _svd.F, 4, 8, 12)}
    assert _sent(results) == results[0]["predicted"] > 0  # every step as the dry run says


def test_svd_pipeline_cfg_parallel_returns_one_process_latents(pools):
    results = pools.run(4, _svd.pipeline_frames, True)
    assert {r["shape"] for r in results} == {(1, _svd.F, 4, 8, 12)}
