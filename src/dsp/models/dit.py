"""The shell both video diffusion transformers share: embedders, blocks, final layer.

``x (B, C_in, T, H, W)`` -> patch embedding + spatial sin-cos positions -> ``(B, T, S, C)``
-> ``blocks`` (each ``block(x, y, t0, mask)``) -> final layer -> unpatchify. Subclasses
build the blocks and name the layers that start at zero under ``config.zero_init``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from torch import Tensor, nn

from dsp.models.layers import (
    FinalLayer,
    Mlp,
    PatchEmbed3D,
    TimestepEmbedder,
    check_heads,
    check_text,
    init_weights,
    sincos_2d,
    temporal_table,
    unpatchify,
)
from dsp.parallelize.plan import Stream


@dataclass(frozen=True)
class VideoDiTConfig:
    """Hyper-parameters shared by the video DiTs (defaults: the XL/2 sizes)."""

    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 4
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    caption_channels: int = 4096  # T5-XXL
    learn_sigma: bool = True  # predict the variance too: out_channels = 2 * in_channels
    space_scale: float = 1.0  # spatial positions are divided by this
    time_scale: float = 1.0  # temporal positions are divided by this
    zero_init: bool = True  # some output projections start at zero (see zero_init_layers)

    def __post_init__(self):
        check_heads(self.hidden_size, self.num_heads)
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4, got {self.hidden_size}")
        if self.depth < 1 or len(self.patch_size) != 3:
            raise ValueError(f"bad depth={self.depth} or patch_size={self.patch_size}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


class VideoDiT(nn.Module):
    """``(x, timestep, y, mask) -> (B, C_out, T, H, W)``.

    Args of ``forward``:
        x: latent video ``(B, C_in, T, H, W)``.
        timestep: diffusion steps ``(B,)``.
        y: text embeddings ``(B, L, caption_channels)``.
        mask: optional ``(B, L)``, True/1 for real text tokens.
    """

    #: the activation between ``blocks.0`` and ``final_layer``, split on T at rest
    dsp_streams = (Stream("x", ("B", "T", "S", "C"), "blocks.0", "final_layer", "T"),)

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        dim = c.hidden_size
        self.x_embedder = PatchEmbed3D(c.patch_size, c.in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # adaLN-single
        self.y_embedder = Mlp(c.caption_channels, dim, dim)  # caption projection
        self.blocks = self.build_blocks(c)
        self.final_layer = FinalLayer(dim, math.prod(c.patch_size) * c.out_channels)
        self.initialize_weights()

    def build_blocks(self, config) -> nn.ModuleList:  # pragma: no cover - overridden
        """The transformer blocks, each called as ``block(x, y, t0, mask, tpe=...)`` (the
        temporal position table for blocks with ``temporal_pos``, else ``None``)."""
        raise TypeError(f"{type(self).__name__} must define build_blocks()")

    def zero_init_layers(self) -> List[nn.Module]:
        """Output projections that start at zero (besides the final layer's)."""
        return []

    def initialize_weights(self) -> None:
        """PixArt / Open-Sora init; with ``config.zero_init`` some output layers start at 0."""
        zero = [self.final_layer.linear, *self.zero_init_layers()]
        normal = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]]
        normal += [self.y_embedder.fc1, self.y_embedder.fc2]
        init_weights(self, normal=normal, zero=zero if self.config.zero_init else ())

    def forward(
        self, x: Tensor, timestep: Tensor, y: Tensor, mask: Optional[Tensor] = None
    ) -> Tensor:
        mask = check_text(y, mask)
        _, ph, pw = self.config.patch_size
        h, w = x.shape[3] // ph, x.shape[4] // pw
        x = self.x_embedder(x)  # (B, T, S, C)
        pos = sincos_2d(x.shape[-1], h, w, scale=self.config.space_scale, device=x.device)
        x = x + pos.to(x.dtype)[None, None]  # (1, 1, S, C): needs the full S, before any split
        t = self.t_embedder(timestep)  # (B, C)
        t0 = self.t_block(t)  # (B, 6C)
        y = self.y_embedder(y)  # (B, L, C)
        tpe = temporal_table(x.shape[-1], x.shape[1], scale=self.config.time_scale, device=x.device)
        tpe = tpe.to(x.dtype)  # (T, C): computed whole here, before any split
        for block in self.blocks:
            x = block(x, y, t0, mask, tpe=tpe if block.temporal_pos else None)  # (B, T, S, C)
        x = self.final_layer(x, t)  # (B, T, S, pt*ph*pw*C_out)
        return unpatchify(x, self.config.patch_size, h, w)  # (B, C_out, T, H, W)
