"""diffusers' ``LatteTransformer3DModel`` (Latte): factorized spatial and temporal attention.

Its forward folds frames into the batch for the spatial blocks, ``(B*F, S, C)``, and patches
for the temporal blocks, ``(B*S, F, C)``, with reshapes in its own forward; per-row
timesteps and per-frame text are keyword or positional arguments of the blocks, and
``temp_pos_embed`` (``1 x F x C``) is added in the model's own forward before the first
temporal block. The stream is the patch tokens from the first spatial block to ``norm_out``.
"""

from __future__ import annotations

from dsp.parallelize import Stream

CLASS = "LatteTransformer3DModel"
SUMMARY = (
    "spatial blocks on frame shards, temporal blocks on patch shards: one switch per "
    "relayout; the frame-position table and per-row timesteps sliced with the tokens"
)


def declarations(model):
    """``(streams, declare)`` for ``model`` (any config: the names do not depend on it)."""
    streams = [
        Stream(
            "x",
            "B F S C",
            entry="transformer_blocks.0",
            exit="norm_out",
            shard="F",
            arg="hidden_states",
            layout="(B F) S C",
            exit_arg=0,
        )
    ]
    declare = {
        "": {"inputs": {"hidden_states": "B Cin F Hi Wi"}, "buffers": {"temp_pos_embed": "1 F C"}},
        "transformer_blocks.*": {
            "inputs": {
                "hidden_states": "(B F) S C",
                "encoder_hidden_states": "(B F) L C",
                "timestep": "(B F) D",
            }
        },
        "transformer_blocks.*.attn1": {
            "compute": "S",
            "inputs": {"hidden_states": "(B F) S C"},
            "sdpa": "(B F) H S D",
        },
        "temporal_transformer_blocks.*": {
            "inputs": {"hidden_states": "(B S) F C", "timestep": "(B S) D"}
        },
        "temporal_transformer_blocks.*.attn1": {
            "compute": "F",
            "inputs": {"hidden_states": "(B S) F C"},
            "sdpa": "(B S) H F D",
        },
    }
    return streams, declare
