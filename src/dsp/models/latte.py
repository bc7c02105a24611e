"""Latte: a video diffusion transformer of alternating spatial and temporal blocks.

After Latte (Ma et al. 2024, "variant 1": interleaved blocks) in its
text-to-video form, diffusers ``LatteTransformer3DModel``: adaLN-single
modulation as in PixArt-alpha, cross-attention to the text in the spatial
blocks only, a sin-cos temporal position embedding added to the input of the
first temporal block. ``depth`` counts all blocks (as in the original Latte
code): even-indexed blocks are spatial, odd-indexed temporal. Differences from
diffusers: one ``(B, T, S, C)`` layout instead of reshaping between
``(B*T, S, C)`` and ``(B*S, T, C)``; cross-attention over all T*S tokens of a
sample at once (equal to diffusers' per-frame cross-attention, since the text
is the same for every frame); position tables computed at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from dsp.models.dit import VideoDiT
from dsp.models.layers import (
    Attention,
    CrossAttention,
    Mlp,
    TemporalPosEmbed,
    adaln_params,
    check_heads,
    modulate,
)


@dataclass(frozen=True)
class LatteConfig:
    """Hyper-parameters of :class:`Latte` (defaults: Latte-XL/2, 14 spatial + 14 temporal)."""

    depth: int = 28  # all blocks; must be even
    hidden_size: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 4
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    caption_channels: int = 4096  # T5-XXL
    learn_sigma: bool = True  # predict the variance too: out_channels = 2 * in_channels
    space_scale: float = 1.0  # spatial positions are divided by this
    time_scale: float = 1.0  # temporal positions are divided by this
    zero_init: bool = True  # PixArt init: cross-attn and final projections start at zero

    def __post_init__(self):
        check_heads(self.hidden_size, self.num_heads)
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4, got {self.hidden_size}")
        if self.depth < 2 or self.depth % 2:
            raise ValueError(f"Latte depth counts all blocks, must be even >= 2, got {self.depth}")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries, got {self.patch_size}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


class LatteBlock(nn.Module):
    """A spatial (``attn_dim="S"``) or temporal (``"T"``) Latte block on ``(B, T, S, C)``.

    ``forward(x, y, t0, mask)`` as :class:`~dsp.models.stdit.STDiTBlock`; a
    block without ``cross_attn`` ignores ``y`` and ``mask``. With
    ``temporal_pos`` the block first adds the temporal position embedding to
    its input (``self.pos_embed``), so the whole block needs the full T.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        attn_dim: str,
        mlp_ratio: float = 4.0,
        cross_attn: bool = True,
        temporal_pos: bool = False,
        time_scale: float = 1.0,
    ):
        super().__init__()
        if temporal_pos and attn_dim != "T":
            raise ValueError("the temporal position embedding belongs in a temporal block")
        self.attn_dim = attn_dim
        self.pos_embed = TemporalPosEmbed(time_scale) if temporal_pos else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_dim=attn_dim)
        self.cross_attn = CrossAttention(dim, num_heads) if cross_attn else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: Tensor, y: Tensor, t0: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if self.pos_embed is not None:
            x = self.pos_embed(x)  # Latte adds it to the residual stream
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaln_params(
            self.scale_shift_table, t0
        )  # each (B, 1, 1, C)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, y, mask)  # no norm before it, as in PixArt
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (B, T, S, C)


class Latte(VideoDiT):
    """Latte text-to-video transformer: ``(x, timestep, y, mask) -> (B, C_out, T, H, W)``.

    Same inputs and outputs as :class:`~dsp.models.stdit.STDiT`.
    """

    def build_blocks(self, c) -> nn.ModuleList:
        return nn.ModuleList(
            LatteBlock(
                c.hidden_size,
                c.num_heads,
                attn_dim="S" if i % 2 == 0 else "T",
                mlp_ratio=c.mlp_ratio,
                cross_attn=(i % 2 == 0),
                temporal_pos=(i == 1),
                time_scale=c.time_scale,
            )
            for i in range(c.depth)
        )

    def zero_init_layers(self):
        """PixArt: the cross-attention output projections start at zero."""
        return [b.cross_attn.proj for b in self.blocks if b.cross_attn is not None]
