"""A fixed, parameter-free latent codec: the "VAE" of the procedural data.

Each ``f x f`` pixel patch becomes four latent channels: the patch's mean red, green and blue,
and its horizontal luma edge (mean grey of the left half minus the right half)::

    encode: (B, 3, T, H, W) -> (B, 4, T, H/f, W/f)
    decode: (B, 4, T, H/f, W/f) -> (B, 3, T, H, W)

``decode`` is the least-squares reconstruction and a right inverse: ``encode(decode(z)) == z``
for every latent ``z``; ``decode(encode(x))`` keeps each patch's mean colour and horizontal
edge (a blurred video). Latents of videos in [-1, 1] lie in [-1, 1] (colour) and [-2, 2]
(edge). Being fixed, it needs no training and no download, and sampling decodes exactly what
the diffusion model produced.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PatchCodec"]


class PatchCodec:
    """Encode pixel videos to latents of :attr:`channels` channels, ``factor`` x smaller in H, W.

    Args:
        factor: patch side in pixels; even (the edge channel splits the patch in halves).
    """

    channels = 4

    def __init__(self, factor: int = 2):
        if factor < 2 or factor % 2:
            raise ValueError(f"PatchCodec: factor must be an even number >= 2, got {factor}")
        self.factor = factor

    def latent_shape(self, frames: int, height: int, width: int) -> tuple:
        """``(C, T, h, w)`` of the latent of a ``frames x height x width`` video."""
        f = self.factor
        if height % f or width % f:
            raise ValueError(
                f"PatchCodec: video height {height} and width {width} must be divisible by "
                f"the codec factor {f}"
            )
        return (self.channels, frames, height // f, width // f)

    def encode(self, video: Tensor) -> Tensor:
        """``(B, 3, T, H, W)`` -> ``(B, 4, T, H/f, W/f)``."""
        b, c, t, hh, ww = video.shape
        if c != 3:
            raise ValueError(f"PatchCodec.encode: expected 3 colour channels, got {c}")
        _, _, h, w = self.latent_shape(t, hh, ww)
        f = self.factor
        x = video.reshape(b, 3, t, h, f, w, f)  # (B, 3, T, h, fy, w, fx)
        mean = x.mean(dim=(4, 6))  # (B, 3, T, h, w)
        grey = x.mean(dim=1)  # (B, T, h, fy, w, fx)
        left = grey[..., : f // 2].mean(dim=(3, 5))  # (B, T, h, w)
        right = grey[..., f // 2 :].mean(dim=(3, 5))
        return torch.cat([mean, (left - right)[:, None]], dim=1)  # (B, 4, T, h, w)

    def decode(self, latent: Tensor) -> Tensor:
        """``(B, 4, T, h, w)`` -> ``(B, 3, T, h*f, w*f)`` (not clamped)."""
        b, c, t, h, w = latent.shape
        if c != self.channels:
            raise ValueError(f"PatchCodec.decode: expected {self.channels} channels, got {c}")
        f = self.factor
        mean, edge = latent[:, :3], latent[:, 3]  # (B, 3, T, h, w), (B, T, h, w)
        sign = latent.new_ones(f)
        sign[f // 2 :] = -1  # +1 on the left half of a patch, -1 on the right
        x = mean[:, :, :, :, None, :, None] + (edge / 2)[:, None, :, :, None, :, None] * sign
        x = x.expand(b, 3, t, h, f, w, f)  # (B, 3, T, h, fy, w, fx)
        return x.reshape(b, 3, t, h * f, w * f)
