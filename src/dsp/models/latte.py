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
from typing import Optional

import torch
from torch import Tensor, nn

from dsp.models.dit import VideoDiT, VideoDiTConfig
from dsp.models.layers import (
    Attention,
    CrossAttention,
    Mlp,
    adaln_params,
    modulate,
)


@dataclass(frozen=True)
class LatteConfig(VideoDiTConfig):
    """Hyper-parameters of :class:`Latte` (defaults: Latte-XL/2, 14 spatial + 14 temporal).

    ``depth`` counts all blocks and must be even.
    """

    def __post_init__(self):
        super().__post_init__()
        if self.depth < 2 or self.depth % 2:
            raise ValueError(f"Latte depth counts all blocks, must be even >= 2, got {self.depth}")


class LatteBlock(nn.Module):
    """A spatial (``attn_dim="S"``) or temporal (``"T"``) Latte block on ``(B, T, S, C)``.

    ``forward(x, y, t0, mask, tpe)`` as :class:`~dsp.models.stdit.STDiTBlock`; a
    block without ``cross_attn`` ignores ``y`` and ``mask``. With
    ``temporal_pos`` the block first adds the temporal position table ``tpe``
    ``(T, C)`` to its input (the residual stream, as Latte does).
    """

    dsp_declare = {"inputs": {0: "B T S C", "tpe": "T C"}}

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        attn_dim: str,
        mlp_ratio: float = 4.0,
        cross_attn: bool = True,
        temporal_pos: bool = False,
    ):
        super().__init__()
        if temporal_pos and attn_dim != "T":
            raise ValueError("the temporal position embedding belongs in a temporal block")
        self.attn_dim = attn_dim
        self.temporal_pos = temporal_pos
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_dim=attn_dim)
        self.cross_attn = CrossAttention(dim, num_heads) if cross_attn else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        t0: Tensor,
        mask: Optional[Tensor] = None,
        tpe: Optional[Tensor] = None,
    ) -> Tensor:
        if tpe is not None:
            x = x + tpe.to(x.dtype)[None, :, None, :]  # Latte adds it to the residual stream
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
            )
            for i in range(c.depth)
        )

    def zero_init_layers(self):
        """PixArt: the cross-attention output projections start at zero."""
        return [b.cross_attn.proj for b in self.blocks if b.cross_attn is not None]
