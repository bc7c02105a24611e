"""diffusers' ``UNetMotionModel`` (AnimateDiff): a 2-D UNet per frame with motion modules.

Its forward folds frames into the batch, ``(B*F, C, H, W)``, for every convolution, ResNet
and spatial transformer (per frame: they run on a shard of the frames as they are); the
timestep embedding and the text are repeated per frame (``(B*F) D``, ``(B*F) L E``
companions of every block). The motion modules normalize over frames and rows together
(``GroupNorm`` on ``(B, C, F, H, W)``), then attend over frames on ``(B*H*W, F, C)``, after
reshapes that use the full ``num_frames`` the UNet passes them: no dim of their input can
stay sharded, so the planner runs them ``whole`` (frames all-gathered in, this rank's frames
kept of the output). The stream is the activation from ``conv_in`` to ``conv_norm_out``,
its frames sharded at every resolution.
"""

from __future__ import annotations

from dsp.parallelize import Stream
from dsp.parallelize.args import Args

CLASS = "UNetMotionModel"
SUMMARY = (
    "every convolution, ResNet and spatial transformer on frame shards; motion modules "
    "whole (frames gathered: their reshapes use the full frame count)"
)


def declarations(model):
    """``(streams, declare)`` for ``model``: the blocks' companions follow their signatures."""
    streams = [
        Stream(
            "x",
            "B F C H W",
            entry="conv_in",
            exit="conv_norm_out",
            shard="F",
            seq=("F",),
            arg=0,
            layout="(B F) C H W",
            exit_arg=0,
        )
    ]
    declare = {"": {"inputs": {"sample": "B Cin F Hi Wi"}}}
    blocks = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
    blocks += [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    blocks += ["mid_block"] if model.mid_block is not None else []
    modules = dict(model.named_modules())
    for name in blocks:
        inputs = {"hidden_states": "(B F) Cb Hb Wb", "temb": "(B F) D"}
        if "encoder_hidden_states" in Args(modules[name]).positional:
            inputs["encoder_hidden_states"] = "(B F) L E"
        declare[name] = {"inputs": inputs}
        declare[f"{name}.motion_modules.*"] = {
            "compute": "F",
            "inputs": {"hidden_states": "(B F) Cm Hm Wm"},
        }
    return streams, declare
