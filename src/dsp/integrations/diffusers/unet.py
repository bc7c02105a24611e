"""What diffusers' video UNets share: frames folded into the batch from ``conv_in`` to
``conv_norm_out``, and blocks in ``down_blocks``, ``mid_block`` and ``up_blocks``."""

from __future__ import annotations

from typing import List

from dsp.parallelize import Stream


def frame_stream() -> Stream:
    """The activation ``(B*F, C, H, W)`` from ``conv_in`` to ``conv_norm_out``, its frames
    sharded at every resolution (gathered at ``conv_norm_out``'s input)."""
    return Stream(
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


def blocks(model) -> List[str]:
    """The UNet's blocks by name: down, up, then the middle one (if any)."""
    names = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
    names += [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    return names + (["mid_block"] if getattr(model, "mid_block", None) is not None else [])
