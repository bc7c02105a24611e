"""Training batches that do not depend on the parallel layout.

Sample ``i`` of the stream (global index ``step * global_batch + j``) always has the same
video, caption, caption dropout, noise and diffusion time, each drawn from a generator seeded
by ``(seed, purpose, i)``. A data-parallel rank takes its slice of the global indices, so any
(dp, sp) layout trains on exactly the same global batches as one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from dsp.data.codec import PatchCodec
from dsp.data.seeds import sample_seed
from dsp.data.shapes import MovingShapes
from dsp.data.text import CaptionEncoder, tokens_of

__all__ = ["Batch", "make_batch"]


@dataclass
class Batch:
    """One (micro-)batch of B samples.

    Attributes:
        x0: clean latents ``(B, C, T, h, w)``.
        noise: Gaussian noise like ``x0``.
        t: diffusion times in [0, 1) ``(B,)``.
        y: caption embeddings ``(B, L, caption_channels)``; mask ``(B, L)`` bool.
        indices: the global sample indices.
    """

    x0: Tensor
    noise: Tensor
    t: Tensor
    y: Tensor
    mask: Tensor
    indices: list

    def to(self, device) -> Batch:
        return Batch(
            *(v.to(device) for v in (self.x0, self.noise, self.t, self.y, self.mask)),
            self.indices,
        )


def make_batch(
    indices: Sequence[int],
    data: MovingShapes,
    codec: PatchCodec,
    text: CaptionEncoder,
    *,
    cond_dropout: float = 0.0,
) -> Batch:
    """The batch of the given global sample indices (deterministic; see the module doc)."""
    seed = data.seed
    videos, tokens, noises, times, drops = [], [], [], [], []
    for i in indices:
        video, spec = data[i]
        videos.append(video)
        tokens.append(tokens_of(spec.color, spec.shape, spec.motion))
        g = torch.Generator().manual_seed(sample_seed(seed, "time", i))
        times.append(torch.rand((), generator=g))
        g = torch.Generator().manual_seed(sample_seed(seed, "drop", i))
        drops.append(bool(torch.rand((), generator=g) < cond_dropout))
    if not indices:
        raise ValueError("make_batch: no sample indices")
    x0 = codec.encode(torch.stack(videos))  # (B, 3, T, H, W) -> (B, C, T, h, w)
    for i in indices:
        g = torch.Generator().manual_seed(sample_seed(seed, "noise", i))
        noises.append(torch.randn(x0.shape[1:], generator=g))
    y, mask = text.encode(torch.tensor(tokens), torch.tensor(drops))
    return Batch(x0, torch.stack(noises), torch.stack(times), y, mask, list(indices))
