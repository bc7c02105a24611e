"""Memory per GPU: parameters, gradients, optimizer state, saved activations.

Saved activations follow what :func:`dsp.memory.saved_activations` measures (each storage
autograd keeps for backward, once), module by module, in units of one token's hidden vector
(``C`` elements of ``e`` bytes) per token the rank holds:

* norm + modulate before an attention or MLP: 2 (the norm's input and output) plus two
  statistics per token;
* self-attention: 6 (the qkv input, q k v, the core's output, the projection's output that
  the gate multiplies) plus the core's log-sum-exp (``H`` fp32 values per token); an
  attention right after another one (STDiT's temporal) has no norm before it;
* cross-attention: 3 (its input, q, the core's output) plus log-sum-exp, plus k and v of the
  text (``2 L C`` per block);
* MLP: 2 (fc1's input, the output the gate multiplies) plus ``2 F / C`` (GELU's input and
  fc2's input);
* outside the blocks: the input video (the patch embedding keeps it), the final layer's
  norm input, norm output and modulated input (3 units on the rank's tokens).

Strategy differences: ``dsp`` holds what its placement runs S-sharded (STDiT's temporal
attention, Latte's temporal block) on ``B s_r T`` tokens; ``ulysses`` and ``usp`` hold q, k,
v, the core's output and its log-sum-exp in the heads layout (``h_r`` heads of all ``T``; USP:
its share of the heads over a row, on the row's chunk of ``T``); ``ring`` saves its fp32
log-sum-exp; ``megatron_sp`` saves each region's gathered input
on all ``B T S`` tokens and its q k v / hidden units for ``h_r`` heads / ``F_r`` units.

With activation checkpointing only each block's input is kept (1 unit per block) and one
block's activations are rebuilt at a time in backward.

Models without closed forms (:attr:`Workload.closed_form`): what autograd saves in the
engine's own step on meta tensors (:func:`dsp.sim.traced.rank_cost`), and under checkpointing
what is saved outside the blocks plus each block's input and the largest block.

Model state per parameter (mixed precision, as ZeRO counts it): ``param_elem`` bytes of
weights and of gradients, and ``3 x master_elem`` of optimizer state (fp32 master, Adam m, v;
without a separate master copy when parameters are fp32 already). ``dp_style`` shards them
over all ``dp x sp`` ranks (one average over the whole mesh, as ``dsp train`` does):
``ddp`` nothing, ``zero1`` the optimizer state, ``zero2`` and gradients, ``fsdp`` everything.
Megatron-SP's tensor-parallel weights are in addition split over the sp group.
"""

from __future__ import annotations

from typing import Dict

from dsp.comm.shards import shard_sizes
from dsp.sim.workload import Workload

__all__ = ["activation_bytes", "model_state_bytes", "memory_bytes"]

_LSE = 4  # log-sum-exp is fp32 whatever the activation dtype


def _usp_heads(w: Workload, r: int):
    """USP rank ``r``'s (sequence length, heads) in the heads layout: its row's chunk of T,
    its share of the heads over the row's ``u`` ranks."""
    u = w.u
    t = shard_sizes(w.T, w.sp)
    row = r // u
    return sum(t[row * u : (row + 1) * u]), shard_sizes(w.shape.H, u)[r % u]


def _block_units(w: Workload, r: int) -> Dict[str, float]:
    """Saved bytes of all blocks on rank ``r`` (``"all"``) and of the largest one (``"one"``)."""
    m, s = w.shape, w.strategy
    B, T, S, C, H, L, e = w.batch, w.T, w.S, m.C, m.H, w.text_len, w.elem
    n = 1 if s == "none" else w.sp
    t_r, s_r = shard_sizes(T, n)[r], shard_sizes(S, n)[r]
    h_r, f_r = shard_sizes(H, n)[r], shard_sizes(m.F, n)[r]
    tok, full = B * t_r * S, B * T * S
    tp = s == "megatron_sp"
    total = block = largest = 0.0
    prev = None
    for op, on_s in zip(m.ops, m.on_s):
        rows = B * s_r * T if (s == "dsp" and on_s) else tok
        b = 0.0
        if op[0] == "mlp" or (op[0] == "attn" and prev != ("attn",)):
            b += rows * (2 * C * e + 2 * 4)  # norm input, output; mean and rstd (fp32)
        if op[0] == "attn":
            if tp:  # gathered input, q k v and output of h_r heads, the gate's input
                b += full * C * e + full * 4 * h_r * m.D * e + full * h_r * _LSE + tok * C * e
            elif op == ("attn", "T") and s in ("ulysses", "usp"):
                # the qkv input and the projection's output on own rows; q k v and the core's
                # output in the heads layout: (B S, all of T or the row's chunk, own heads)
                length, heads = (T, h_r) if s == "ulysses" else _usp_heads(w, r)
                b += rows * 2 * C * e + B * S * length * heads * (4 * m.D * e + _LSE)
            else:
                b += rows * (6 * C * e + H * _LSE)
        elif op[0] == "cross":
            if tp:
                b += full * C * e + 2 * full * h_r * m.D * e + full * h_r * _LSE
                b += 2 * B * L * h_r * m.D * e
            else:
                b += rows * (3 * C * e + H * _LSE) + 2 * B * L * C * e
        else:  # mlp
            if tp:
                b += full * C * e + 2 * full * f_r * e + tok * C * e
            else:
                b += rows * (2 * C * e + 2 * m.F * e)
        block += b
        prev = ("attn",) if op[0] == "attn" else op
        if op == ("mlp",) or op == m.ops[-1]:  # a block ends with its MLP
            total += block
            largest = max(largest, block)
            block = 0.0
    total += block
    return {"all": total, "one": max(largest, block), "tok": tok}


def activation_bytes(w: Workload, r: int = 0) -> Dict[str, float]:
    """Saved activations of rank ``r``: ``saved`` (kept from forward to backward) and
    ``peak`` (adds the one block rebuilt at a time under activation checkpointing)."""
    if w.mode == "infer":
        return {"saved": 0.0, "peak": 0.0}
    if not w.closed_form:  # the engine's step on meta tensors (dsp.sim.traced)
        from dsp.sim.traced import rank_cost

        c = rank_cost(w, r)
        if w.activation_checkpointing:
            return {"saved": c.saved_checkpointed, "peak": c.saved_checkpointed + c.block_max}
        return {"saved": c.saved, "peak": c.saved}
    m = w.shape
    blocks = _block_units(w, r)
    e = w.elem
    outside = w.batch * m.patch_in * w.T * w.S * e + 3 * blocks["tok"] * m.C * e
    outside += w.batch * w.text_len * (m.caption + m.C) * e  # caption projection inputs
    if w.activation_checkpointing:
        saved = outside + m.depth * blocks["tok"] * m.C * e
        return {"saved": saved, "peak": saved + blocks["one"]}
    saved = outside + blocks["all"]
    return {"saved": saved, "peak": saved}


def model_state_bytes(w: Workload) -> Dict[str, float]:
    """Parameters, gradients and optimizer state per GPU under ``w.dp_style``."""
    if w.closed_form:
        m = w.shape
        params, tp = m.params, m.tp_params if w.strategy == "megatron_sp" else 0
    else:
        from dsp.sim.traced import rank_cost

        c = rank_cost(w, 0)
        params, tp = c.params, c.tp_params
    mesh = w.dp * w.sp
    local = (params - tp) + tp / w.sp  # parameters this rank computes with
    params, grads = local * w.param_elem, local * w.param_elem
    master = w.master_elem if w.param_elem < 4 else 0
    opt = local * (master + 2 * max(w.master_elem, w.param_elem)) if w.mode == "train" else 0
    style = w.dp_style
    if style in ("zero1", "zero2", "fsdp"):
        opt /= mesh
    if style in ("zero2", "fsdp"):
        grads /= mesh
    if style == "fsdp":
        params /= mesh
    if w.mode == "infer":
        grads = 0
    return {"params": params, "grads": grads, "optimizer": opt}


def memory_bytes(w: Workload, r: int = 0) -> Dict[str, float]:
    """Everything above plus ``total`` (model state + activation peak) for rank ``r``."""
    state = model_state_bytes(w)
    act = activation_bytes(w, r)
    out = {**state, "activations_saved": act["saved"], "activations_peak": act["peak"]}
    out["total"] = sum(state.values()) + act["peak"]
    return out
