"""FLOPs per rank of one step, module by module, from the model's shapes.

Counted as :mod:`torch.utils.flop_counter` counts: 2 per multiply-add of every matmul,
linear and convolution, and the two matmuls of attention (``q k^T`` and ``p v``); norms,
softmax and other elementwise work are not FLOPs here (they are in the achieved FLOP/s).

Per rank ``r`` of a strategy (sizes ``t_r, s_r, h_r`` from ``torch.tensor_split``):

* every strategy runs the patch embedding on the whole input (the entry split is at
  ``blocks.0``), the timestep and caption embedders replicated, token-wise work on its
  ``B t_r S`` tokens;
* ``dsp``: what its placement runs S-sharded (STDiT's temporal attention, Latte's whole
  temporal block) on ``B s_r T`` tokens;
* ``ulysses``: the temporal core on all ``T`` and ``S`` with ``h_r`` heads;
* ``ring``: the temporal core with ``t_r`` queries against all ``T`` keys;
* ``usp``: Ulysses in rows of ``u`` (``h_u`` heads) with the row's chunk of queries;
* ``megatron_sp``: attention, cross-attention and MLP on all ``B T S`` tokens with ``h_r``
  heads / ``F_r`` hidden units (tensor parallel), the rest on ``B t_r S``.

Backward: twice the forward (input and weight gradients) except for the three layers whose
input needs no gradient (patch embedding, the timestep MLP's first linear, the caption
projection's first linear), which compute weight gradients only; attention cores ``attn_bwd``
times their forward (2 for plain matmuls, 2.5 for FlashAttention, which recomputes ``q k^T``).
Activation checkpointing adds one more forward of the blocks.
"""

from __future__ import annotations

from typing import Dict

from dsp.comm.shards import shard_sizes
from dsp.sim.workload import Workload

__all__ = ["forward_flops", "step_flops"]


def _lin(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def _usp_chunk(w: Workload, r: int) -> int:
    t = w.t_sizes()
    row = r // w.u
    return sum(t[row * w.u : (row + 1) * w.u])


def forward_flops(w: Workload, r: int = 0) -> Dict[str, int]:
    """Forward FLOPs of rank ``r``, by part: ``embed``, ``blocks_linear``, ``blocks_core``,
    ``final`` and ``first_layers`` (the weight-only-gradient layers, included in ``embed``)."""
    m, s = w.shape, w.strategy
    B, T, S, C, D, L = w.batch, w.T, w.S, m.C, m.D, w.text_len
    n = 1 if s == "none" else w.sp
    t_r = shard_sizes(T, n)[r]
    s_r = shard_sizes(S, n)[r]
    h_r = shard_sizes(m.H, n)[r]
    f_r = shard_sizes(m.F, n)[r]
    tok, full = B * t_r * S, B * T * S
    tp = s == "megatron_sp"
    first = _lin(B * T * S, m.patch_in, C) + _lin(B, 256, C) + _lin(B * L, m.caption, C)
    embed = first + _lin(B, C, C) + _lin(B, C, 6 * C) + _lin(B * L, C, C)
    linear = core = 0
    for op, on_s in zip(m.ops, m.on_s):
        rows = B * s_r * T if (s == "dsp" and on_s) else tok
        if op[0] == "attn":
            other = S if op[1] == "T" else T  # the dim that acts as batch
            seq = T if op[1] == "T" else S  # the dim attended over
            if tp:
                linear += _lin(full, C, 3 * h_r * D) + _lin(full, h_r * D, C)
                core += 4 * B * other * seq * seq * h_r * D
                continue
            linear += _lin(rows, C, 3 * C) + _lin(rows, C, C)
            if op[1] == "S" or s in ("none", "dsp"):  # local: own rows, whole sequence
                core += 4 * (rows // seq) * seq * seq * C
            elif s == "ulysses":
                core += 4 * B * S * T * T * h_r * D
            elif s == "ring":
                core += 4 * B * S * t_r * T * C
            else:  # usp
                core += 4 * B * S * _usp_chunk(w, r) * T * shard_sizes(m.H, w.u)[r % w.u] * D
        elif op[0] == "cross":
            if tp:
                linear += _lin(full, C, h_r * D) + _lin(B * L, C, 2 * h_r * D)
                linear += _lin(full, h_r * D, C)
                core += 4 * full * L * h_r * D
            else:
                linear += _lin(rows, C, C) + _lin(B * L, C, 2 * C) + _lin(rows, C, C)
                core += 4 * rows * L * C
        else:  # mlp
            linear += _lin(full, C, f_r) + _lin(full, f_r, C) if tp else 2 * _lin(rows, C, m.F)
    return {
        "embed": embed,
        "first_layers": first,
        "blocks_linear": linear,
        "blocks_core": core,
        "final": _lin(tok, C, m.P),
    }


def step_flops(w: Workload, r: int = 0, *, attn_bwd: float = 2.0) -> Dict[str, float]:
    """FLOPs of one step on rank ``r``: ``forward``, ``backward``, ``recompute`` and ``total``.

    Without closed forms (:attr:`Workload.closed_form`): ``torch.utils.flop_counter``'s count
    of the engine's own step on meta tensors (:func:`dsp.sim.traced.rank_cost`), the fused
    attention kernels' backward taken as ``attn_bwd`` times their forward."""
    if not w.closed_form:
        from dsp.sim.traced import rank_cost

        c = rank_cost(w, r).flops
        rec = c["blocks_forward"] if w.mode == "train" and w.activation_checkpointing else 0
        fwd = c["forward"]
        bwd = 0.0
        if w.mode == "train":
            bwd = c["backward"] - c["attn_backward"] + attn_bwd * c["attn_forward"]
        return {"forward": fwd, "backward": bwd, "recompute": rec, "total": fwd + bwd + rec}
    f = forward_flops(w, r)
    fwd = f["embed"] + f["blocks_linear"] + f["blocks_core"] + f["final"]
    if w.mode == "infer":
        return {"forward": fwd, "backward": 0, "recompute": 0, "total": fwd}
    bwd = 2 * (fwd - f["blocks_core"] - f["first_layers"]) + f["first_layers"]
    bwd += attn_bwd * f["blocks_core"]
    rec = f["blocks_linear"] + f["blocks_core"] if w.activation_checkpointing else 0
    return {"forward": fwd, "backward": bwd, "recompute": rec, "total": fwd + bwd + rec}
