"""Closed-form bytes sent per rank, forward and backward, for every strategy.

These functions are the formulas of ``docs/communication.md``; the tests assert that
``dsp.comm_log()`` measures exactly these numbers. Notation (all per rank ``r``):

``B`` batch, ``T`` frames, ``S`` patches per frame, ``C`` hidden, ``H`` heads, ``D = C / H``,
``N`` group size, ``e`` element size, ``t_r, s_r, h_r`` this rank's shard lengths of T, S and
heads (``torch.tensor_split``), ``P`` the final layer's output channels per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from torch import nn

from dsp.comm.shards import shard_sizes
from dsp.models.layers import Attention, CrossAttention, Mlp


@dataclass(frozen=True)
class Shape:
    """The activation of the sharded region and the group."""

    B: int
    T: int
    S: int
    C: int
    H: int
    N: int
    r: int
    e: int

    @property
    def t_r(self) -> int:
        return shard_sizes(self.T, self.N)[self.r]

    @property
    def s_r(self) -> int:
        return shard_sizes(self.S, self.N)[self.r]

    @property
    def h_r(self) -> int:
        return shard_sizes(self.H, self.N)[self.r]

    @property
    def D(self) -> int:
        return self.C // self.H


# ----------------------------------------------------------------------------- per-op terms
def switch_bytes(x: Shape, src: str) -> int:
    """One switch of (B, T, S, C) from ``src`` to the other sequence dim."""
    if src == "T":  # (B, t_r, S, C) -> (B, T, s_r, C)
        return x.B * x.C * x.e * x.t_r * (x.S - x.s_r)
    return x.B * x.C * x.e * x.s_r * (x.T - x.t_r)


def ulysses_bytes(x: Shape) -> Dict[str, int]:
    """One Ulysses attention over T: q, k, v seq -> heads, output heads -> seq."""
    to_heads = x.B * x.S * x.D * x.e * x.t_r * (x.H - x.h_r)  # (B*S, t_r, H, D) -> (.., T, h_r, ..)
    to_seq = x.B * x.S * x.D * x.e * x.h_r * (x.T - x.t_r)
    return {"forward": 3 * to_heads + to_seq, "backward": 3 * to_seq + to_heads}


def megatron_region_bytes(x: Shape) -> int:
    """All-gather of (B, T, S, C) along T plus reduce-scatter back (same in backward)."""
    ag = x.B * x.t_r * x.S * x.C * x.e * (x.N - 1)
    rs = x.B * x.S * x.C * x.e * (x.T - x.t_r)
    return ag + rs


def usp_bytes(x: Shape, u: int, ring_bytes) -> Dict[str, int]:
    """One USP attention over T: Ulysses inside a row of ``u`` ranks, then ring across rows.

    Row ``j = r // u`` holds the contiguous chunk ``L_j`` (the sum of its members' T shards);
    this rank holds ``h_u`` heads of ``tensor_split(H, u)`` after the Ulysses all-to-all.
    """
    t_sizes = shard_sizes(x.T, x.N)
    chunks = [sum(t_sizes[j * u : (j + 1) * u]) for j in range(x.N // u)]
    row, col = divmod(x.r, u)
    h_u = shard_sizes(x.H, u)[col]
    to_heads = x.B * x.S * x.D * x.e * x.t_r * (x.H - h_u)
    to_seq = x.B * x.S * x.D * x.e * h_u * (chunks[row] - x.t_r)
    ring = (
        ring_bytes(chunks, row, x.B * x.S, h_u, x.D, x.e)
        if x.N // u > 1
        else {"forward": 0, "backward": 0}
    )
    return {
        "forward": 3 * to_heads + to_seq + ring["forward"],
        "backward": 3 * to_seq + to_heads + ring["backward"],
    }


def boundary_bytes(x: Shape, p: int) -> Dict[str, int]:
    """Entry split of (B, T, S, C) and exit gather of (B, T, S, P), both along T.

    The split's backward is local (``grad_mode="shard"``) and the gather's a slice.
    """
    return {"forward": x.B * x.t_r * x.S * p * x.e * (x.N - 1), "backward": 0}


# ----------------------------------------------------------------------------- model totals
def _count(model: nn.Module, pred) -> int:
    return sum(1 for n, m in model.named_modules() if n.startswith("blocks.") and pred(m))


def expected_bytes(
    strategy: str,
    model: nn.Module,
    *,
    batch: int,
    frames: int,
    patches: int,
    world_size: int,
    rank: int,
    elem_size: int,
    ring_bytes=None,
    ulysses_degree: Optional[int] = None,
) -> Dict[str, int]:
    """Bytes rank ``rank`` sends in one forward and one backward of ``model`` (unmodified,
    single-device) under ``strategy``. ``frames``/``patches``: T and S after patchify.

    ``ring_bytes(seq_sizes, rank, batch, heads, head_dim, elem_size)`` is the ring attention
    formula (from :mod:`dsp.attention.ring`), needed for ``ring``.
    """
    if ring_bytes is None:
        from dsp.attention.ring import ring_bytes
    if strategy == "none" or world_size == 1:
        return {"forward": 0, "backward": 0}
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    c = attn.proj.in_features
    x = Shape(batch, frames, patches, c, c // attn.head_dim, world_size, rank, elem_size)
    p = model.final_layer.linear.out_features
    total = boundary_bytes(x, p)

    def add(fwd: int, bwd: int, times: int = 1) -> None:
        total["forward"] += times * fwd
        total["backward"] += times * bwd

    n_t_attn = _count(model, lambda m: isinstance(m, Attention) and m.attn_dim == "T")
    if strategy == "dsp":
        from dsp.models.plans import hand_plan

        n_stages = sum(1 for st in hand_plan(model).stages if st.compute == ("T",))
        both = switch_bytes(x, "T") + switch_bytes(x, "S")
        add(both, both, n_stages)
    elif strategy == "ulysses":
        u = ulysses_bytes(x)
        add(u["forward"], u["backward"], n_t_attn)
    elif strategy == "megatron_sp":
        regions = _count(model, lambda m: isinstance(m, (Attention, CrossAttention, Mlp)))
        m = megatron_region_bytes(x)
        add(m, m, regions)
    elif strategy == "ring":
        rb = ring_bytes(shard_sizes(x.T, x.N), x.r, x.B * x.S, x.H, x.D, x.e)
        add(rb["forward"], rb["backward"], n_t_attn)
    elif strategy == "usp":
        u = ulysses_degree or world_size
        rb = usp_bytes(x, u, ring_bytes)
        add(rb["forward"], rb["backward"], n_t_attn)
    else:
        raise ValueError(f"dsp: no byte formula for strategy {strategy!r}")
    return total


def per_layer_forward(strategy: str, x: Shape, ring: Optional[Dict[str, int]] = None) -> int:
    """Forward bytes of one STDiT layer (spatial + temporal attention, cross-attn, MLP)."""
    if strategy == "dsp":
        return switch_bytes(x, "T") + switch_bytes(x, "S")
    if strategy == "ulysses":
        return ulysses_bytes(x)["forward"]
    if strategy == "megatron_sp":
        return 4 * megatron_region_bytes(x)
    if strategy == "ring" and ring is not None:
        return ring["forward"]
    raise ValueError(f"dsp: no per-layer formula for strategy {strategy!r}")
