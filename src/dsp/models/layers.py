"""Shared building blocks of the video diffusion transformers (STDiT, Latte).

Conventions every block-level module keeps, so that parallel strategies can be
applied from outside (hooks, module swaps, ``module.core = ...``):

* activations are ``(B, T, S, C)``: T frames, S = h*w patches per frame;
* T and S are read from ``x.shape`` at run time, never from a config;
* the only position-dependent module is :class:`Attention` (over ``attn_dim``,
  exposed as ``compute_dim``); frame positions are a ``(T, C)`` table the
  parent computes (:func:`temporal_table`) and passes in. Everything else is
  token-wise. ``dsp_declare`` states the layouts of the inputs and of the
  attention's q, k, v for :mod:`dsp.parallelize` (data, no parallel code).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SEQ_DIMS = ("S", "T")


def sdpa_core(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Default attention core: softmax(q k^T / sqrt(D)) v via PyTorch SDPA.

    Args:
        q: ``(N, Lq, H, D)``; k, v: ``(N, Lk, H, D)``.
        mask: optional key-padding mask ``(N, Lk)`` bool, True = attend.

    Returns:
        ``(N, Lq, H, D)``.
    """
    attn_mask = None if mask is None else mask[:, None, None, :]  # (N, 1, 1, Lk)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (N, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, Lq, D)
    return out.transpose(1, 2)  # (N, Lq, H, D)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` (shift/scale broadcast over x)."""
    return x * (1 + scale) + shift


def adaln_params(table: Tensor, t: Tensor) -> Tuple[Tensor, ...]:
    """Split adaLN-single parameters per block.

    Args:
        table: the block's ``scale_shift_table`` ``(K, C)``.
        t: the shared timestep projection ``(B, K*C)``.

    Returns:
        K tensors of shape ``(B, 1, 1, C)`` that broadcast over ``(B, T, S, C)``.
    """
    k = table.shape[0]
    params = table[None] + t.reshape(t.shape[0], k, -1)  # (B, K, C)
    return params[:, :, None, None, :].unbind(1)


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """Sin-cos embedding ``(L, dim)`` of positions ``(L,)``: ``[sin(p w_i), cos(p w_i)]``."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.to(torch.float64)[:, None] * omega[None]  # (L, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, h: int, w: int, *, scale: float = 1.0, device=None) -> Tensor:
    """Sin-cos embedding ``(h*w, dim)`` of a row-major h x w grid.

    The first half encodes the column, the second half the row (the MAE /
    Open-Sora order; unlike their numpy code, also correct for h != w).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim % 4 == 0, got {dim}")
    cols = sincos_1d(dim // 2, torch.arange(w, device=device) / scale)  # (w, dim/2)
    rows = sincos_1d(dim // 2, torch.arange(h, device=device) / scale)  # (h, dim/2)
    emb = torch.cat([cols[None].expand(h, w, -1), rows[:, None].expand(h, w, -1)], dim=-1)
    return emb.reshape(h * w, dim)


def temporal_table(dim: int, frames: int, *, scale: float = 1.0, device=None) -> Tensor:
    """Sin-cos embedding ``(T, dim)`` of frames ``0..T-1`` (divided by ``scale``).

    The parent's forward computes it from the full T and passes it to the block that adds it
    (a *companion* of the activation: a parallel plan slices it with the frames it holds).
    """
    return sincos_1d(dim, torch.arange(frames, device=device) / scale)


class Attention(nn.Module):
    """Multi-head self-attention over one sequence dim of ``(B, T, S, C)``.

    ``attn_dim="S"`` attends over the patches of each frame, ``"T"`` over the
    frames of each patch; the other dims act as batch. ``self.core`` (default
    :func:`sdpa_core`) is a plain attribute a strategy may replace. The head
    count is read from the ``qkv`` output, so a narrower ``qkv``/``proj`` pair
    (fewer heads) works unchanged. ``forward(x, pos=None)``: a ``(T, C)``
    position table added to the input along T before ``qkv`` (Open-Sora adds
    the temporal embedding there).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        attn_dim: str,
        qkv_bias: bool = True,
    ):
        super().__init__()
        if attn_dim not in SEQ_DIMS:
            raise ValueError(f"attn_dim must be one of {SEQ_DIMS}, got {attn_dim!r}")
        check_heads(dim, num_heads)
        self.attn_dim = attn_dim
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.core = sdpa_core

    @property
    def compute_dim(self) -> str:
        """The sequence dim this module needs whole (same as ``attn_dim``)."""
        return self.attn_dim

    @property
    def dsp_declare(self) -> dict:
        """Layouts for :mod:`dsp.parallelize`: the input, the position table, q/k/v."""
        other = "T" if self.attn_dim == "S" else "S"
        return {
            "inputs": {0: "B T S C", "pos": "T C"},
            "sdpa": f"(B {other}) H {self.attn_dim} D",
        }

    def forward(self, x: Tensor, pos: Optional[Tensor] = None) -> Tensor:
        b, t, s, c = x.shape
        if pos is not None:
            x = x + pos.to(x.dtype)[None, :, None, :]  # (T, C) along T
        if self.attn_dim == "S":
            x = x.reshape(b * t, s, c)  # (B*T, S, C)
        else:
            x = x.transpose(1, 2).reshape(b * s, t, c)  # (B*S, T, C)
        n, seq, _ = x.shape
        qkv = self.qkv(x).view(n, seq, 3, -1, self.head_dim)  # (N, L, 3, H, D)
        q, k, v = qkv.unbind(2)  # (N, L, H, D)
        out = self.core(q, k, v, mask=None)  # (N, L, H, D)
        out = self.proj(out.reshape(n, seq, -1))  # (N, L, C)
        if self.attn_dim == "S":
            return out.view(b, t, s, -1)  # (B, T, S, C)
        return out.view(b, s, t, -1).transpose(1, 2)  # (B, S, T, C) -> (B, T, S, C)

    def extra_repr(self) -> str:
        return f"attn_dim={self.attn_dim!r}, head_dim={self.head_dim}"


class CrossAttention(nn.Module):
    """Multi-head cross-attention from video tokens to text tokens (token-wise in T and S).

    Queries are all T*S tokens of a sample, keys/values its text tokens; an
    optional key-padding ``mask`` ``(B, L)`` (True = keep) handles prompts of
    different lengths. ``self.core`` is replaceable as in :class:`Attention`.
    """

    def __init__(self, dim: int, num_heads: int, *, cond_dim: Optional[int] = None):
        super().__init__()
        check_heads(dim, num_heads)
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(cond_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.core = sdpa_core

    def forward(self, x: Tensor, cond: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        b, t, s, _ = x.shape
        n, seq = cond.shape[:2]
        q = self.q(x).reshape(b, t * s, -1, self.head_dim)  # (B, T*S, H, D)
        k, v = self.kv(cond).view(n, seq, 2, -1, self.head_dim).unbind(2)  # (B, L, H, D)
        out = self.core(q, k, v, mask=mask)  # (B, T*S, H, D)
        return self.proj(out.reshape(b, t * s, -1)).view(b, t, s, -1)  # (B, T, S, C)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}"


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU: ``fc2(gelu(fc1(x)))``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Diffusion timestep ``(B,)`` -> ``(B, C)``: sinusoid features then an MLP (DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """``(B,)`` -> ``(B, dim)`` features ``[cos(t f_i), sin(t f_i)]``."""
        half = dim // 2
        i = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * i / half)  # (dim/2,)
        args = t.float()[:, None] * freqs[None]  # (B, dim/2)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        freq = self.sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)  # (B, C)


class PatchEmbed3D(nn.Module):
    """Video ``(B, C_in, T, H, W)`` -> tokens ``(B, T/pt, (H/ph)*(W/pw), C)`` (strided Conv3d)."""

    def __init__(self, patch_size: Tuple[int, int, int], in_channels: int, dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        for name, n, p in zip("THW", x.shape[2:], self.patch_size):
            if n % p:
                raise ValueError(f"input {name}={n} is not divisible by patch size {p}")
        x = self.proj(x)  # (B, C, T', h, w)
        return x.flatten(3).permute(0, 2, 3, 1)  # (B, T', h*w, C)


class FinalLayer(nn.Module):
    """Output head: LayerNorm, adaLN shift/scale from the timestep embedding, Linear."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        params = self.scale_shift_table[None] + t[:, None]  # (B, 2, C): t is (B, C), not (B, 2C)
        shift, scale = params[:, :, None, None, :].unbind(1)  # (B, 1, 1, C)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, S, P)


def unpatchify(x: Tensor, patch_size: Tuple[int, int, int], h: int, w: int) -> Tensor:
    """Tokens ``(B, T', h*w, pt*ph*pw*C_out)`` -> video ``(B, C_out, T'*pt, h*ph, w*pw)``."""
    b, t = x.shape[:2]
    pt, ph, pw = patch_size
    x = x.reshape(b, t, h, w, pt, ph, pw, -1)  # (B, T', h, w, pt, ph, pw, C_out)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C_out, T', pt, h, ph, w, pw)
    return x.reshape(b, x.shape[1], t * pt, h * ph, w * pw)


def check_heads(dim: int, num_heads: int) -> None:
    """Raise unless ``dim`` splits into ``num_heads`` heads."""
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")


def check_text(y: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
    """Validate text embeddings ``(B, L, C)`` and mask ``(B, L)``; return the mask as bool."""
    if y.dim() != 3:
        raise ValueError(f"text embeddings y must be (B, L, C), got shape {tuple(y.shape)}")
    if mask is None:
        return None
    if mask.shape != y.shape[:2]:
        raise ValueError(f"mask must be (B, L) = {tuple(y.shape[:2])}, got {tuple(mask.shape)}")
    mask = mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every sample needs at least one unmasked text token")
    return mask


def init_weights(
    model: nn.Module, *, normal: Iterable[nn.Linear] = (), zero: Iterable[nn.Linear] = ()
) -> None:
    """DiT / Open-Sora init: xavier-uniform Linear weights with zero bias, patch
    embedding like a Linear, ``normal`` Linears N(0, 0.02), ``zero`` Linears all zeros."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed3D):
            w = m.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for m in normal:
        nn.init.normal_(m.weight, std=0.02)
    for m in zero:
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
