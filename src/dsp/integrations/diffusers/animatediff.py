"""diffusers' ``UNetMotionModel`` (AnimateDiff): a 2-D UNet per frame with motion modules.

Its forward folds frames into the batch, ``(B*F, C, H, W)``, for every convolution, ResNet
and spatial transformer (per frame: they run on a shard of the frames as they are); the
timestep embedding and the text are repeated per frame (``(B*F) D``, ``(B*F) L E``
companions of every block). The motion modules reshape with the full ``num_frames`` the
UNet passes them, normalize over frames and rows together (``GroupNorm`` on
``(B, C, F, H, W)``) and attend over frames on ``(B*H*W, F, C)``: the planner runs each on a
shard of its own rows or columns (``shard``: ``Hm``/``Wm``, whose length changes with the
resolution), one switch in and one back, with the norm's statistics summed over the ranks
(:mod:`dsp.parallelize.norms`). The stream is the activation from ``conv_in`` to
``conv_norm_out``, its frames sharded at every resolution.
"""

from __future__ import annotations

from dsp.integrations.diffusers.unet import blocks, frame_stream
from dsp.parallelize.args import Args

CLASS = "UNetMotionModel"
SUMMARY = (
    "every convolution, ResNet and spatial transformer on frame shards; motion modules on "
    "row shards (one switch in, one back; GroupNorm statistics summed over ranks)"
)


def declarations(model):
    """``(streams, declare)`` for ``model``: the blocks' companions follow their signatures."""
    streams = [frame_stream()]
    declare = {"": {"inputs": {"sample": "B Cin F Hi Wi"}}}
    modules = dict(model.named_modules())
    for name in blocks(model):
        inputs = {"hidden_states": "(B F) Cb Hb Wb", "temb": "(B F) D"}
        if "encoder_hidden_states" in Args(modules[name]).positional:
            inputs["encoder_hidden_states"] = "(B F) L E"
        declare[name] = {"inputs": inputs}
        declare[f"{name}.motion_modules.*"] = {
            "compute": "F",
            "inputs": {"hidden_states": "(B F) Cm Hm Wm"},
            "shard": "Hm Wm",
            "norm": "B Cm F Hm Wm",
        }
    return streams, declare
