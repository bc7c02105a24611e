"""Procedural video data for training and sampling: nothing is downloaded.

* :class:`MovingShapes`: videos of one coloured shape moving across a black frame, each a
  pure function of ``(seed, index)``, with a three-word caption (colour, shape, motion).
* :class:`PatchCodec`: a fixed, parameter-free "VAE": pixel videos ``(B, 3, T, H, W)`` to
  latents ``(B, 4, T, H/f, W/f)`` (per-patch colour means and a luma edge) and back.
* :class:`CaptionEncoder`: a fixed embedding table standing in for a text encoder: caption
  tokens to ``(B, L, caption_channels)`` embeddings and a ``(B, L)`` mask.
* :func:`make_batch`: the latents, captions, noise and timesteps of a list of global sample
  indices at a training step, identical whatever the parallel layout.
"""

from dsp.data.batch import Batch, make_batch
from dsp.data.codec import PatchCodec
from dsp.data.seeds import sample_seed
from dsp.data.shapes import COLORS, MOTIONS, SHAPES, MovingShapes, ShapeSpec
from dsp.data.text import CAPTION_LEN, CaptionEncoder, parse_prompt

__all__ = [
    "Batch",
    "CAPTION_LEN",
    "COLORS",
    "CaptionEncoder",
    "MOTIONS",
    "MovingShapes",
    "PatchCodec",
    "SHAPES",
    "ShapeSpec",
    "make_batch",
    "parse_prompt",
    "sample_seed",
]
