"""STDiT: the spatial-temporal diffusion transformer of Open-Sora 1.0.

Each block runs spatial self-attention (over S), temporal self-attention (over
T), cross-attention to the text and an MLP, modulated by adaLN-single (one
timestep projection shared by all blocks plus a per-block table). Follows
hpcaitech/Open-Sora ``opensora/models/stdit/stdit.py`` (v1.0) with these
layout-driven differences: activations stay ``(B, T, S, C)``; position
embeddings are sin-cos tables computed at run time for the actual T, h, w;
text prompts of different lengths use a key-padding mask instead of packing.
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
class STDiTConfig(VideoDiTConfig):
    """Hyper-parameters of :class:`STDiT` (defaults: STDiT-XL/2)."""


class STDiTBlock(nn.Module):
    """One STDiT layer on ``(B, T, S, C)``.

    ``forward(x, y, t0, mask, tpe)``: x ``(B, T, S, C)``, text ``y`` ``(B, L, C)``,
    timestep projection ``t0`` ``(B, 6C)``, text mask ``(B, L)`` bool or None,
    temporal position table ``tpe`` ``(T, C)`` (the first block only, as Open-Sora).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        temporal_pos: bool = False,
    ):
        super().__init__()
        self.temporal_pos = temporal_pos
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_dim="S")
        self.attn_temp = Attention(dim, num_heads, attn_dim="T")
        self.cross_attn = CrossAttention(dim, num_heads)
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
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaln_params(
            self.scale_shift_table, t0
        )  # each (B, 1, 1, C)
        # spatial attention (over S)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        # temporal attention (over T); Open-Sora 1.0 applies no norm here and reuses gate_msa;
        # it adds the temporal position embedding to this input only (not to the residual)
        x = x + gate_msa * self.attn_temp(x, pos=tpe)
        # cross-attention to the text, then the MLP (both token-wise)
        x = x + self.cross_attn(x, y, mask)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (B, T, S, C)


class STDiT(VideoDiT):
    """Open-Sora 1.0 STDiT: ``(x, timestep, y, mask) -> (B, C_out, T, H, W)``.

    Args of ``forward``:
        x: latent video ``(B, C_in, T, H, W)``.
        timestep: diffusion steps ``(B,)``.
        y: text embeddings ``(B, L, caption_channels)``.
        mask: optional ``(B, L)``, True/1 for real text tokens.
    """

    def build_blocks(self, c) -> nn.ModuleList:
        return nn.ModuleList(
            STDiTBlock(
                c.hidden_size,
                c.num_heads,
                mlp_ratio=c.mlp_ratio,
                temporal_pos=(i == 0),
            )
            for i in range(c.depth)
        )

    def zero_init_layers(self):
        """Open-Sora: the temporal and cross-attention output projections start at zero."""
        return [m for b in self.blocks for m in (b.attn_temp.proj, b.cross_attn.proj)]
