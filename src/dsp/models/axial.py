"""A 3-axis axial video transformer: attention over T, over H and over W separately.

Plain single-device code under the rules of :mod:`dsp.models.layers`, in 3-D:

* activations are ``(B, T, H, W, C)``: T frames of h x w patches (dims 1, 2, 3 = axes);
* T, H and W are read from ``x.shape`` at run time, never from the config;
* the only position-dependent module is :class:`AxialAttention` (attention and a sin-cos
  position embedding along its ``axis``), which exposes that axis as ``compute_dim``;
  norms, MLPs, the patch embedding's output and the head are token-wise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor, nn

from dsp.models.layers import Mlp, check_heads, sdpa_core, sincos_1d
from dsp.parallelize.plan import Stream

AXES = ("T", "H", "W")  # tensor dims 1, 2, 3 of (B, T, H, W, C)


@dataclass(frozen=True)
class AxialConfig:
    """Hyper-parameters of :class:`AxialTransformer`."""

    depth: int = 2
    hidden_size: int = 32
    num_heads: int = 4
    mlp_ratio: float = 4.0
    in_channels: int = 4
    out_channels: int = 4
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    axis_pos: bool = True  # each attention adds a sin-cos embedding of its axis position

    def __post_init__(self):
        check_heads(self.hidden_size, self.num_heads)
        if self.hidden_size % 2:
            raise ValueError(f"hidden_size must be even, got {self.hidden_size}")
        if self.depth < 1 or len(self.patch_size) != 3:
            raise ValueError(f"bad depth={self.depth} or patch_size={self.patch_size}")


class AxialAttention(nn.Module):
    """Multi-head self-attention along one axis of ``(B, T, H, W, C)``.

    The two other axes act as batch. With ``pos``, a sin-cos embedding of the position
    along ``axis`` is added to the input first (positions ``0..L-1``, ``L`` from the input).
    """

    def __init__(self, dim: int, num_heads: int, *, axis: str, pos: bool = True):
        super().__init__()
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        check_heads(dim, num_heads)
        self.axis, self.pos = axis, pos
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.core = sdpa_core

    @property
    def compute_dim(self) -> str:
        """The axis this module needs whole."""
        return self.axis

    def forward(self, x: Tensor) -> Tensor:
        d = 1 + AXES.index(self.axis)
        length, c = x.shape[d], x.shape[-1]
        if self.pos:
            emb = sincos_1d(c, torch.arange(length, device=x.device)).to(x.dtype)  # (L, C)
            shape = [1] * x.dim()
            shape[d], shape[-1] = length, c
            x = x + emb.view(shape)  # broadcast along the axis
        xm = x.movedim(d, -2)  # (B, a, b, L, C): the other two axes first
        lead = xm.shape[:-2]
        seq = xm.reshape(-1, length, c)  # (N, L, C)
        n = seq.shape[0]
        qkv = self.qkv(seq).view(n, length, 3, -1, self.head_dim)  # (N, L, 3, heads, D)
        q, k, v = qkv.unbind(2)  # (N, L, heads, D)
        out = self.proj(self.core(q, k, v, mask=None).reshape(n, length, -1))  # (N, L, C)
        return out.view(*lead, length, -1).movedim(-2, d)  # (B, T, H, W, C)

    def extra_repr(self) -> str:
        return f"axis={self.axis!r}, head_dim={self.head_dim}, pos={self.pos}"


class AxialBlock(nn.Module):
    """Pre-norm residual block: attention over T, over H, over W, then an MLP."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, pos: bool = True):
        super().__init__()
        self.norm_t = nn.LayerNorm(dim)
        self.attn_t = AxialAttention(dim, num_heads, axis="T", pos=pos)
        self.norm_h = nn.LayerNorm(dim)
        self.attn_h = AxialAttention(dim, num_heads, axis="H", pos=pos)
        self.norm_w = nn.LayerNorm(dim)
        self.attn_w = AxialAttention(dim, num_heads, axis="W", pos=pos)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn_t(self.norm_t(x))  # (B, T, H, W, C)
        x = x + self.attn_h(self.norm_h(x))
        x = x + self.attn_w(self.norm_w(x))
        return x + self.mlp(self.norm_mlp(x))


class AxialTransformer(nn.Module):
    """Video ``(B, C_in, T, H, W)`` -> ``(B, C_out, T, H, W)`` through axial blocks."""

    dsp_streams = (Stream("x", ("B", "T", "H", "W", "C"), "blocks.0", "final_layer", "T"),)

    def __init__(self, config: AxialConfig):
        super().__init__()
        self.config = c = config
        self.x_embedder = nn.Conv3d(
            c.in_channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size
        )
        self.blocks = nn.ModuleList(
            AxialBlock(c.hidden_size, c.num_heads, mlp_ratio=c.mlp_ratio, pos=c.axis_pos)
            for _ in range(c.depth)
        )
        self.final_layer = nn.Sequential(
            nn.LayerNorm(c.hidden_size),
            nn.Linear(c.hidden_size, math.prod(c.patch_size) * c.out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        for name, n, p in zip(AXES, x.shape[2:], self.config.patch_size):
            if n % p:
                raise ValueError(f"input {name}={n} is not divisible by patch size {p}")
        x = self.x_embedder(x).permute(0, 2, 3, 4, 1)  # (B, C, T, h, w) -> (B, T, h, w, C)
        for block in self.blocks:
            x = block(x)  # (B, T, h, w, C)
        x = self.final_layer(x)  # (B, T, h, w, pt*ph*pw*C_out)
        b, t, h, w = x.shape[:4]
        pt, ph, pw = self.config.patch_size
        x = x.reshape(b, t, h, w, pt, ph, pw, -1)  # (B, T, h, w, pt, ph, pw, C_out)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C_out, T, pt, h, ph, w, pw)
        return x.reshape(b, x.shape[1], t * pt, h * ph, w * pw)
