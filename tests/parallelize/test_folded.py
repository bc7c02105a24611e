"""A model written in the folded style of real code, planned from declarations alone.

``FoldedVideo`` (docs/examples/parallelize_folded.py) folds frames into the batch and
reshapes ``(B*F, S, C) <-> (B*S, F, C)`` in its own forward, passes per-row timesteps as a
keyword argument, adds a frame-position buffer in the parent's forward, runs a 3x3
convolution over the patch grid and one attention over all F*S tokens. B = 2, F = 5 frames,
S = 12 patches: uneven over 2 and 3 ranks.
"""

import re
from pathlib import Path

import pytest

from tests.parallelize import _folded

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n", [2, 3])
def test_planner_plan_equals_one_process_with_the_dry_runs_bytes(pools, n):
    results = pools.run(n, _folded.equality)
    assert sum(r["sent"] for r in results) == results[0]["predicted"] > 0
    kinds = results[0]["kinds"]
    assert kinds[""] == "local"  # the frame-position buffer is sliced with the frames
    assert kinds["full"] in ("heads", "ring")  # all F*S tokens: no dim left to switch to


@pytest.mark.parametrize("kinds", [("compute", "ring"), ("compute", "whole")])
def test_every_way_to_run_the_full_attention(pools, kinds):
    (result, *_) = pools.run(3, _folded.equality, "planner", kinds)
    assert result["kinds"]["full"] == kinds[1]


@pytest.mark.parametrize("strategy", ["dsp", "ulysses", "ring", "usp"])
def test_strategies_are_plans_for_the_same_model(pools, strategy):
    results = pools.run(2, _folded.equality, strategy)
    assert sum(r["sent"] for r in results) == results[0]["predicted"]


@pytest.mark.parametrize("how", ["planner", "ulysses"])
def test_activation_checkpointing_equals_the_run_without(pools, how):
    plain = pools.run(2, _folded.equality, how)
    again = pools.run(2, _folded.equality, how, None, True)
    # recomputation repeats the forward's collectives inside backward, nothing else
    assert all(a["sent"] > b["sent"] for a, b in zip(again, plain))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"mixx": {"compute": "S"}}, r"'mixx', which matches no module.*did you mean \['mix'\]"),
        (
            {"mix": {"compute": "S", "inputs": {"hidden": "(B F) S C"}}},
            r"'mix' \(GridConv\) declares input 'hidden', but its forward takes "
            r"\['hidden_states', 'height', 'width'\]",
        ),
        (
            {"temporal.*": {"inputs": {"hidden_states": "(B S) F C", "timestep": "(B F) D"}}},
            r"input 'timestep' of 'temporal.0'.*\(B F\) has length 24, expected 10",
        ),
        (
            {"temporal.*": {"inputs": {"hidden_states": "(B S) F C", "timestep": "(F X) D"}}},
            r"input 'timestep' of 'temporal.0': the fold \(F X\) has length 24, not divisible "
            r"by the known part 5",
        ),
        (
            {"spatial.*": {"inputs": {"hidden_states": "(B F) S", "timestep": "(B F) D"}}},
            r"input 'hidden_states' of 'spatial.0'.*\(3 dims\), but its layout \(B F\) S has 2",
        ),
    ],
    ids=["unknown-module", "unknown-argument", "rows-mismatch", "fold", "dims"],
)
def test_bad_declarations_fail_on_every_rank_before_any_collective(pools, change, message):
    errors = pools.run(2, _folded.bad_declaration, change)
    assert all(e is not None and re.search(message, e) for e in errors), errors


def test_a_sharded_dim_the_tensor_lacks():
    from dsp.parallelize import PlanError, Stream

    with pytest.raises(PlanError, match=r"names dim 'W'.*have dims \('B', 'F', 'S', 'C'\)"):
        Stream("x", "B F S C", "spatial.0", "out", "W", arg="hidden_states")
    with pytest.raises(PlanError, match=r"\(seq\) names dim 'H'"):
        Stream("x", "B F S C", "spatial.0", "out", "F", seq=("F", "H"))


def test_the_doc_shows_the_declarations():
    doc = (ROOT / "docs" / "parallelize.md").read_text()
    script = (ROOT / "docs" / "examples" / "parallelize_folded.py").read_text()
    declared = script[script.index("STREAMS = [") : script.index("# ---", script.index("STREAMS"))]
    assert declared.strip() in doc
