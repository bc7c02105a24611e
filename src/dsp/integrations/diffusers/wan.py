"""diffusers' ``WanTransformer3DModel`` (Wan 2.1/2.2): full 3-D attention over all tokens.

Its forward patchifies ``(B, C, F, H, W)`` into ``B x (F*S)`` tokens (``S`` patches per
frame), computes rotary tables ``(cos, sin)`` of shape ``1 x (F*S) x 1 x D`` once, and passes
them to every block. Self-attention spans every token, so no dim is left to switch to: the
planner runs it as ``heads`` (Ulysses: q, k, v switched from frames to heads inside the
attention) or ``ring``; the rotary tables are sliced with the tokens, cross-attention to the
replicated text runs locally. The stream is the tokens from the first block to
``norm_out``. Temporal patch size 1 (every released Wan checkpoint) is required: the frames
of the input are then the token grid's frames.
"""

from __future__ import annotations

from dsp.parallelize import PlanError, Stream

CLASS = "WanTransformer3DModel"
SUMMARY = (
    "self-attention over all F*S tokens as heads (Ulysses) inside DSP's plan; rotary "
    "tables sliced with the tokens; cross-attention, FFN and modulation local"
)


def declarations(model):
    """``(streams, declare)`` for ``model``."""
    p_t = tuple(model.config.patch_size)[0]
    if p_t != 1:
        raise PlanError(
            f"WanTransformer3DModel with temporal patch size {p_t}: only patch_size (1, h, w) "
            "is declared (the input's frames must be the token grid's frames)"
        )
    streams = [
        Stream(
            "x",
            "B F S C",
            entry="blocks.0",
            exit="norm_out",
            shard="F",
            arg="hidden_states",
            layout="B (F S) C",
            exit_arg=0,
        )
    ]
    declare = {
        "": {"inputs": {"hidden_states": "B Cin F Hi Wi"}},
        "blocks.*": {"inputs": {"hidden_states": "B (F S) C"}},
        "blocks.*.attn1": {
            "compute": ("F", "S"),
            "inputs": {"hidden_states": "B (F S) C", "rotary_emb": "1 (F S) 1 D"},
            "sdpa": "B H (F S) D",
        },
    }
    return streams, declare
