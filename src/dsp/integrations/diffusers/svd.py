"""diffusers' ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion).

Its forward folds frames into the batch, ``(B*F, C, H, W)``; every block receives the
per-frame timestep embedding ``(B*F) D``, image embedding ``(B*F) L E`` and
``image_only_indicator`` ``(B, F)``, and reshapes with ``num_frames =
image_only_indicator.shape[-1]``. The stream is the activation from ``conv_in`` to
``conv_norm_out``, its frames sharded at every resolution:

* each block slices its companions to its frames (the blocks' reshapes then see the local
  frame count, consistently);
* spatial ResNets, down- and upsampling convolutions run per frame, on the frame shard as
  they are;
* temporal ResNets (a ``(3, 1, 1)`` convolution over frames, ``GroupNorm`` over frames and
  rows) run on a shard of their own rows or columns (``Ht``/``Wt``): one switch in, one
  back, the norms' statistics summed over the ranks, the per-frame embedding gathered;
* the spatio-temporal transformers number the frames they see in their own forward
  (``arange(num_frames)``), so they must see every frame: each runs on a shard of its own
  rows or columns (``Ha``/``Wa``; per-frame ``GroupNorm`` statistics summed over ranks,
  image embedding and indicator gathered), and its spatial blocks, which attend over rows
  and columns, are *nested* stages inside it that switch from its rows to frames and back.
  Nothing runs whole.
"""

from __future__ import annotations

from dsp.integrations.diffusers.unet import blocks, frame_stream
from dsp.parallelize.args import Args

CLASS = "UNetSpatioTemporalConditionModel"
SUMMARY = (
    "spatial ResNets and convolutions on frame shards; temporal ResNets and spatio-temporal "
    "transformers on row shards (GroupNorm statistics summed over ranks), their spatial "
    "attention blocks switched back to frame shards inside them"
)


def declarations(model):
    """``(streams, declare)`` for ``model`` (any config: names follow its blocks)."""
    streams = [frame_stream()]
    declare = {"": {"inputs": {"sample": "B F Cin Hi Wi"}}}
    modules = dict(model.named_modules())
    for name in blocks(model):
        inputs = {
            "hidden_states": "(B F) Cb Hb Wb",
            "temb": "(B F) D",
            "image_only_indicator": "B F",
        }
        if "encoder_hidden_states" in Args(modules[name]).positional:
            inputs["encoder_hidden_states"] = "(B F) L E"
        declare[name] = {"inputs": inputs}
        declare[f"{name}.resnets.*.temporal_res_block"] = {
            "compute": "F",
            "inputs": {"input_tensor": "B Ct F Ht Wt", "temb": "B F D"},
            "shard": "Ht Wt",
            "norm": "B Ct F Ht Wt",
        }
        if hasattr(modules[name], "attentions"):
            declare[f"{name}.attentions.*"] = {
                "compute": "F",
                "inputs": {
                    "hidden_states": "(B F) Ca Ha Wa",
                    "encoder_hidden_states": "(B F) L E",
                    "image_only_indicator": "B F",
                },
                "output": {0: "(B F) Ca Ha Wa"},  # called with return_dict=False: a tuple
                "shard": "Ha Wa",
                "norm": "(B F) Ca Ha Wa",
            }
            declare[f"{name}.attentions.*.transformer_blocks.*"] = {
                "compute": "Ha Wa",
                "inputs": {
                    "hidden_states": "(B F) (Ha Wa) Ct",
                    "encoder_hidden_states": "(B F) L E",
                },
            }
    return streams, declare
