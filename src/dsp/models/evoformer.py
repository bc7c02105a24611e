"""An Evoformer-style protein trunk (AlphaFold 2, Jumper et al. 2021, Algorithms 6-15).

Plain single-device code. Two representations flow through the blocks:

* the MSA ``(B, M, R, Cm)``: M aligned sequences of R residues;
* the pair ``(B, I, J, Cz)``: one vector per residue pair (I = J = R).

Rules that let :mod:`dsp.parallelize` act from outside (as in :mod:`dsp.models.layers`):
sizes are read from the inputs; every module that needs a sequence dim whole says so in
``compute_dim`` (MSA row attention: R; column attention and the outer-product mean: M;
triangle updates and attention: the dim they sum or attend over); a module that uses a
child's output whole along every dim names it in ``full_operands`` (pair biases, the right
operand of the outer-product mean, the gathered operand of a triangle multiplication),
computed in the stream's dim order; the outer-product mean, whose output is a pair built
from MSA residues, maps an MSA sharded on R to a pair sharded on I (``shard_map``).
Everything else (norms, transitions, gates) is token-wise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from dsp.parallelize.plan import Stream


@dataclass(frozen=True)
class EvoformerConfig:
    """Hyper-parameters of :class:`Evoformer` (defaults: a tiny model)."""

    depth: int = 2
    c_m: int = 16  # MSA channels
    c_z: int = 8  # pair channels
    heads_msa: int = 2
    heads_pair: int = 2
    c_hidden: int = 4  # per-head channels of every attention
    c_opm: int = 4  # outer-product-mean projection
    c_tri: int = 8  # triangle multiplication channels
    transition: int = 2  # transition expansion factor

    def __post_init__(self):
        if min(self.depth, self.c_m, self.c_z, self.heads_msa, self.heads_pair) < 1:
            raise ValueError(f"every size must be positive: {self}")


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``softmax(q k^T / sqrt(D) + bias) v`` for ``(..., heads, L, D)``; bias broadcasts."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (..., heads, Lq, Lk)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1) @ v  # (..., heads, Lq, D)


class GatedAttention(nn.Module):
    """Gated multi-head self-attention over dim -2 of ``(..., L, C)`` (AF2 Algorithm 7 core).

    A generic core: it does not know which named dim is dim -2, so it declares nothing; the
    modules that call it do.
    """

    def __init__(self, c_in: int, c_hidden: int, heads: int):
        super().__init__()
        self.heads, self.c_hidden = heads, c_hidden
        self.q = nn.Linear(c_in, heads * c_hidden, bias=False)
        self.k = nn.Linear(c_in, heads * c_hidden, bias=False)
        self.v = nn.Linear(c_in, heads * c_hidden, bias=False)
        self.gate = nn.Linear(c_in, heads * c_hidden)
        self.out = nn.Linear(heads * c_hidden, c_in)

    def forward(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        def split_heads(t: Tensor) -> Tensor:  # (..., L, h*c) -> (..., h, L, c)
            return t.view(*t.shape[:-1], self.heads, self.c_hidden).transpose(-2, -3)

        o = attend(split_heads(self.q(x)), split_heads(self.k(x)), split_heads(self.v(x)), bias)
        o = o.transpose(-2, -3).flatten(-2)  # (..., L, h*c)
        return self.out(torch.sigmoid(self.gate(x)) * o)  # (..., L, C)


class MSARowAttentionWithPairBias(nn.Module):
    """Each MSA row attends over its residues, biased by the pair (Algorithm 7)."""

    compute_dim = "R"
    full_operands = {"pair_bias": ("I", "J")}

    def __init__(self, c_m: int, c_z: int, c_hidden: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(c_m)
        self.pair_bias = nn.Sequential(nn.LayerNorm(c_z), nn.Linear(c_z, heads, bias=False))
        self.attn = GatedAttention(c_m, c_hidden, heads)

    def forward(self, msa: Tensor, pair: Tensor) -> Tensor:
        bias = self.pair_bias(pair).permute(0, 3, 1, 2)[:, None]  # (B, 1, heads, I, J)
        return self.attn(self.norm(msa), bias)  # (B, M, R, Cm): over R for each row


class MSAColumnAttention(nn.Module):
    """Each MSA column (residue) attends over the sequences (Algorithm 8)."""

    compute_dim = "M"

    def __init__(self, c_m: int, c_hidden: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(c_m)
        self.attn = GatedAttention(c_m, c_hidden, heads)

    def forward(self, msa: Tensor) -> Tensor:
        x = self.norm(msa).transpose(1, 2)  # (B, R, M, Cm)
        return self.attn(x).transpose(1, 2)  # (B, M, R, Cm)


class Transition(nn.Module):
    """Token-wise MLP: LayerNorm, Linear(n c), ReLU, Linear(c) (Algorithms 9, 15)."""

    def __init__(self, c: int, n: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(c), nn.Linear(c, n * c), nn.ReLU(), nn.Linear(n * c, c)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class OuterProductMean(nn.Module):
    """MSA -> pair update: mean over sequences of outer products (Algorithm 10)."""

    compute_dim = "M"
    full_operands = {"right": ("M", "R")}
    shard_map = {"R": "I"}  # residues i of the left operand become pair rows

    def __init__(self, c_m: int, c_z: int, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c_m)
        self.left = nn.Linear(c_m, c)
        self.right = nn.Linear(c_m, c)
        self.out = nn.Linear(c * c, c_z)

    def forward(self, msa: Tensor) -> Tensor:
        m = self.norm(msa)
        a, b = self.left(m), self.right(m)  # (B, M, R, c) each
        o = torch.einsum("bsic,bsjd->bijcd", a, b) / msa.shape[1]  # (B, I, J, c, c)
        return self.out(o.flatten(-2))  # (B, I, J, Cz)


class GatedLinear(nn.Module):
    """``sigmoid(gate(z)) * proj(z)``: a triangle multiplication operand."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.proj = nn.Linear(c_in, c_out)
        self.gate = nn.Linear(c_in, c_out)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.gate(z)) * self.proj(z)


class TriangleMultiplication(nn.Module):
    """Outgoing ``sum_k a_ik b_jk`` or incoming ``sum_k a_ki b_kj`` (Algorithms 11, 12).

    Outgoing sums over the J dim of its operands and needs ``b`` whole; incoming sums over
    the I dim and needs ``a`` whole.
    """

    def __init__(self, c_z: int, c: int, *, outgoing: bool):
        super().__init__()
        self.outgoing = outgoing
        self.compute_dim = "J" if outgoing else "I"
        self.full_operands = {"right" if outgoing else "left": ("I", "J")}
        self.norm_in = nn.LayerNorm(c_z)
        self.left = GatedLinear(c_z, c)
        self.right = GatedLinear(c_z, c)
        self.norm_out = nn.LayerNorm(c)
        self.out = nn.Linear(c, c_z)
        self.gate = nn.Linear(c_z, c_z)

    def forward(self, z: Tensor) -> Tensor:
        z = self.norm_in(z)  # (B, I, J, Cz)
        a, b = self.left(z), self.right(z)  # (B, I, J, c)
        if self.outgoing:
            x = torch.einsum("bikc,bjkc->bijc", a, b)
        else:
            x = torch.einsum("bkic,bkjc->bijc", a, b)
        return torch.sigmoid(self.gate(z)) * self.out(self.norm_out(x))  # (B, I, J, Cz)

    def extra_repr(self) -> str:
        return f"outgoing={self.outgoing}"


class TriangleAttention(nn.Module):
    """Attention around the starting node (over J, per row) or the ending node (over I, per
    column), biased by the third edge of each triangle (Algorithms 13, 14)."""

    full_operands = {"bias": ("I", "J")}

    def __init__(self, c_z: int, c_hidden: int, heads: int, *, starting: bool):
        super().__init__()
        self.starting = starting
        self.compute_dim = "J" if starting else "I"
        self.norm = nn.LayerNorm(c_z)
        self.bias = nn.Linear(c_z, heads, bias=False)
        self.attn = GatedAttention(c_z, c_hidden, heads)

    def forward(self, z: Tensor) -> Tensor:
        z = self.norm(z)  # (B, I, J, Cz)
        b = self.bias(z)  # (B, I, J, heads), used whole
        if self.starting:  # z_ij attends over z_ik, bias b_jk
            return self.attn(z, b.permute(0, 3, 1, 2)[:, None])  # bias (B, 1, heads, J, K)
        # z_ij attends over z_kj, bias b_ki: attention over I for each column j
        out = self.attn(z.transpose(1, 2), b.permute(0, 3, 2, 1)[:, None])  # (B, J, I, Cz)
        return out.transpose(1, 2)  # (B, I, J, Cz)

    def extra_repr(self) -> str:
        return f"starting={self.starting}"


class EvoformerBlock(nn.Module):
    """One Evoformer block (Algorithm 6): the MSA stack, then the pair stack."""

    def __init__(self, c: EvoformerConfig):
        super().__init__()
        self.row_attn = MSARowAttentionWithPairBias(c.c_m, c.c_z, c.c_hidden, c.heads_msa)
        self.col_attn = MSAColumnAttention(c.c_m, c.c_hidden, c.heads_msa)
        self.msa_transition = Transition(c.c_m, c.transition)
        self.opm = OuterProductMean(c.c_m, c.c_z, c.c_opm)
        self.tri_out = TriangleMultiplication(c.c_z, c.c_tri, outgoing=True)
        self.tri_in = TriangleMultiplication(c.c_z, c.c_tri, outgoing=False)
        self.tri_att_start = TriangleAttention(c.c_z, c.c_hidden, c.heads_pair, starting=True)
        self.tri_att_end = TriangleAttention(c.c_z, c.c_hidden, c.heads_pair, starting=False)
        self.pair_transition = Transition(c.c_z, c.transition)

    def forward(self, msa: Tensor, pair: Tensor) -> Tuple[Tensor, Tensor]:
        msa = msa + self.row_attn(msa, pair)  # (B, M, R, Cm)
        msa = msa + self.col_attn(msa)
        msa = msa + self.msa_transition(msa)
        pair = pair + self.opm(msa)  # (B, I, J, Cz)
        pair = pair + self.tri_out(pair)
        pair = pair + self.tri_in(pair)
        pair = pair + self.tri_att_start(pair)
        pair = pair + self.tri_att_end(pair)
        pair = pair + self.pair_transition(pair)
        return msa, pair


class Evoformer(nn.Module):
    """A stack of Evoformer blocks: ``(msa (B, M, R, Cm), pair (B, R, R, Cz)) -> (msa, pair)``."""

    dsp_streams = (
        Stream("msa", ("B", "M", "R", "Cm"), "blocks.0", "msa_norm", "M", arg=0),
        Stream("pair", ("B", "I", "J", "Cz"), "blocks.0", "pair_norm", "I", arg=1),
    )

    def __init__(self, config: EvoformerConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(EvoformerBlock(config) for _ in range(config.depth))
        self.msa_norm = nn.LayerNorm(config.c_m)
        self.pair_norm = nn.LayerNorm(config.c_z)

    def forward(self, msa: Tensor, pair: Tensor) -> Tuple[Tensor, Tensor]:
        r = msa.shape[2]
        if pair.shape[1:3] != (r, r):
            want, got = (r, r), tuple(pair.shape)
            raise ValueError(f"pair must be (B, {want}, Cz) for msa {tuple(msa.shape)}, got {got}")
        for block in self.blocks:
            msa, pair = block(msa, pair)
        return self.msa_norm(msa), self.pair_norm(pair)
