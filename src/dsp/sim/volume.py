"""Communication of one step, per rank, as a list of transfers on named groups.

Bytes are the exact formulas of docs/communication.md (:mod:`dsp.strategies.volume` and
:func:`dsp.attention.ring.ring_bytes`), split by collective so that a link model can price
them: ``a2a`` (all-to-all; gloo and NCCL all-gather / reduce-scatter of uneven shards go the
same way here), ``p2p`` (ring steps), ``allreduce`` / ``reduce_scatter`` / ``all_gather``
(gradient and parameter traffic on the dp x sp mesh). Each transfer names the ranks it spans
(``span``: consecutive ranks of the mesh, sp innermost), so a cluster knows which link it
takes, and its number of calls (for per-call latency).

Activation checkpointing recomputes each block's forward in backward, communication
included: the blocks' forward transfers appear again in the ``backward`` phase.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List

from dsp.attention.ring import ring_bytes
from dsp.comm.shards import shard_sizes
from dsp.sim.workload import Workload
from dsp.strategies.volume import (
    Shape,
    boundary_bytes,
    megatron_region_bytes,
    switch_bytes,
    ulysses_bytes,
)

__all__ = ["Transfer", "transfers", "sp_bytes", "sync_transfers"]


@dataclass(frozen=True)
class Transfer:
    """``bytes`` sent by one rank in ``calls`` collectives of kind ``kind`` over ``span`` ranks
    (``ring``: for ``p2p``, the number of members of the ring the steps go around)."""

    kind: str
    phase: str  # "forward" | "backward" | "sync"
    bytes: float
    calls: int
    span: int
    what: str
    ring: int = 0


def _x(w: Workload, r: int) -> Shape:
    m = w.shape
    return Shape(w.batch, w.T, w.S, m.C, m.H, w.sp, r, w.elem)


def _sp_transfers(w: Workload, r: int) -> List[Transfer]:
    """The sequence-parallel strategy's own transfers (forward and backward, no recompute)."""
    m, s, n = w.shape, w.strategy, w.sp
    if s == "none" or n == 1:
        return []
    x = _x(w, r)
    out = [Transfer("a2a", "forward", boundary_bytes(x, m.P)["forward"], 1, n, "exit gather")]
    n_t = m.count(("attn", "T"))
    if s == "dsp":
        # one T-stage per block that attends over T (STDiT's temporal attention, Latte's
        # temporal block): switch T -> S before, S -> T after; the adjoints in backward
        both = switch_bytes(x, "T") + switch_bytes(x, "S")
        for phase in ("forward", "backward"):
            out.append(Transfer("a2a", phase, n_t * both, 2 * n_t, n, "switch"))
    elif s == "ulysses":
        u = ulysses_bytes(x)
        for phase in ("forward", "backward"):
            out.append(Transfer("a2a", phase, n_t * u[phase], 4 * n_t, n, "ulysses"))
    elif s == "megatron_sp":
        regions = sum(1 for o in m.ops if o[0] in ("attn", "cross", "mlp"))
        b = megatron_region_bytes(x)
        for phase in ("forward", "backward"):
            out.append(Transfer("a2a", phase, regions * b, 2 * regions, n, "ag+rs"))
    elif s == "ring":
        rb = ring_bytes(shard_sizes(w.T, n), r, w.batch * w.S, m.H, m.D, w.elem)
        fwd, bwd = n_t * rb["forward"], n_t * rb["backward"]
        out.append(Transfer("p2p", "forward", fwd, n_t * (n - 1), n, "ring", ring=n))
        out.append(Transfer("p2p", "backward", bwd, n_t * (2 * n - 1), n, "ring", ring=n))
    elif s == "usp":
        u = w.u
        if n % u:
            raise ValueError(f"usp: ulysses degree {u} does not divide sp = {n}")
        t = shard_sizes(w.T, n)
        chunks = [sum(t[j * u : (j + 1) * u]) for j in range(n // u)]
        row, col = divmod(r, u)
        h_u = shard_sizes(m.H, u)[col]
        a = w.batch * w.S * m.D * w.elem * t[r] * (m.H - h_u)
        b = w.batch * w.S * m.D * w.elem * h_u * (chunks[row] - t[r])
        a2a = {"forward": 3 * a + b, "backward": a + 3 * b}
        rows = n // u
        ring = (
            ring_bytes(chunks, row, w.batch * w.S, h_u, m.D, w.elem)
            if rows > 1
            else {"forward": 0, "backward": 0}
        )
        calls = {"forward": rows - 1, "backward": 2 * rows - 1}
        for phase in ("forward", "backward"):
            out.append(Transfer("a2a", phase, n_t * a2a[phase], 4 * n_t, u, "ulysses rows"))
            if rows > 1:
                out.append(
                    Transfer(
                        "p2p", phase, n_t * ring[phase], n_t * calls[phase], n, "usp ring", rows
                    )
                )
    else:
        raise ValueError(f"dsp simulate: no byte formula for strategy {s!r}")
    return out


def transfers(w: Workload, r: int = 0) -> List[Transfer]:
    """Everything rank ``r`` sends in one step of ``w``: the strategy's transfers (forward
    only for ``mode="infer"``), recomputed forward transfers under activation checkpointing,
    and gradient / parameter traffic on the ``dp x sp`` mesh (``w.grad_sync``). Without
    closed forms (:attr:`Workload.closed_form`) the strategy's transfers are those the engine
    issues on meta tensors (:func:`dsp.sim.traced.rank_cost`)."""
    if w.closed_form:
        sp = _sp_transfers(w, r)
        again = [t for t in sp if t.phase == "forward" and t.what != "exit gather"]
        m = w.shape
        params, tp, depth = m.params, m.tp_params if w.strategy == "megatron_sp" else 0, m.depth
    else:
        from dsp.sim.traced import rank_cost

        c = rank_cost(w, r)
        sp, again = list(c.transfers), list(c.recompute)
        params, tp, depth = c.params, c.tp_params, c.depth
    if w.mode == "infer":
        return [t for t in sp if t.phase == "forward"]
    out = list(sp)
    if w.activation_checkpointing:  # the blocks' forward again, inside backward
        out += [
            dataclasses.replace(t, phase="backward", what=t.what + " (recompute)") for t in again
        ]
    return out + sync_transfers(w, params, tp, depth)


def sync_transfers(w: Workload, params: int, tp: int, depth: int) -> List[Transfer]:
    """Gradient and parameter traffic of one step on the ``dp x sp`` mesh (``w.dp_style``):
    ``params`` parameters, ``tp`` of them tensor-parallel over sp (synchronised over dp
    only), ``depth`` blocks (FSDP gathers per block)."""
    mesh = w.dp * w.sp
    if not w.grad_sync or mesh == 1 or w.mode == "infer":
        return []
    out = []
    rep, frac = (params - tp) * w.param_elem, (mesh - 1) / mesh
    tp_b, frac_dp = tp / w.sp * w.param_elem, (w.dp - 1) / w.dp
    if w.dp_style == "fsdp":  # all-gather params in forward and backward, reduce-scatter grads
        for what, k in (("params fwd", "all_gather"), ("params bwd", "all_gather")):
            out.append(Transfer(k, "sync", (rep + tp_b) * frac, depth + 1, mesh, what))
        out.append(
            Transfer("reduce_scatter", "sync", (rep + tp_b) * frac, depth + 1, mesh, "grads")
        )
    elif w.dp_style in ("zero1", "zero2"):  # reduce-scatter grads, all-gather updated params
        out.append(Transfer("reduce_scatter", "sync", rep * frac, 1, mesh, "grads"))
        out.append(Transfer("all_gather", "sync", rep * frac, 1, mesh, "params"))
    else:
        out.append(Transfer("allreduce", "sync", 2 * rep * frac, 1, mesh, "grads"))
    if tp and w.dp > 1 and w.dp_style != "fsdp":  # tensor-parallel grads: over dp only
        out.append(Transfer("allreduce", "sync", 2 * tp_b * frac_dp, 1, mesh, "tp grads"))
    return out


def sp_bytes(w: Workload, r: int = 0) -> dict:
    """Bytes of the strategy's own transfers, by phase (what ``dsp bench`` reports as
    ``bytes_sent_forward`` / ``bytes_sent_backward``), and ``grad_sync``."""
    out = {"forward": 0.0, "backward": 0.0, "sync": 0.0}
    for t in transfers(w, r):
        out[t.phase] += t.bytes
    return out
