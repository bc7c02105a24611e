"""Time-aware mesh search: the sp degree, the dp x sp mesh and, when sp spans nodes, which
sequence dim the inter-node axis shards, minimizing predicted time per sample under a
memory limit.

Candidates on ``G`` GPUs, for each strategy and each ``sp`` dividing ``G`` (``dp = G / sp``):

* ``flat``: the sp group is ``sp`` consecutive ranks; within a node its collectives use the
  intra-node link, a group that spans nodes pays the inter-node link for all of its bytes;
* for ``dsp`` on a video DiT with ``sp = a x b`` spanning ``b`` nodes of ``a`` GPUs, two 2-D
  placements:

  - ``2-stage switch``: between stages the activation is ``(B, T/b, S/a, C)``: T over the
    inter-node axis, S over the intra-node one. Each switch is an all-to-all inside the node
    (NVLink) and one across nodes that moves only ``(b-1)/b`` of a rank's data over
    InfiniBand, where the flat switch moves ``(N-1)/N`` of it at the slower link's rate. It
    sends *more* bytes in total than the flat switch, so a bytes-only planner never picks it.
  - ``ring over T`` / ``ring over S``: the inter-node axis shards that dim all step long; DSP
    switches the other dim inside a node only, and the stages that need the inter-sharded dim
    whole run ring attention across the ``b`` nodes. Bytes are the switch and ring formulas
    of docs/communication.md on the local sizes.

The score is time per sample (step time / (batch x dp)); a candidate whose memory per GPU
exceeds the limit is kept in the table but never chosen. :func:`search` returns every
candidate, best first; ``candidates[0]`` is the plan.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

from dsp.attention.ring import ring_bytes
from dsp.comm.shards import shard_sizes
from dsp.sim.hardware import Cluster
from dsp.sim.step import simulate, transfer_time
from dsp.sim.volume import Transfer, transfers
from dsp.sim.workload import Workload
from dsp.strategies.volume import Shape, switch_bytes

__all__ = ["hierarchical_transfers", "search"]


def hierarchical_transfers(w: Workload, a: int, inter: str) -> List[Transfer]:
    """Rank 0's transfers for DSP with ``sp = a x b`` (``a`` per node), the inter-node axis
    sharding ``inter`` (``"T"`` or ``"S"``) for the whole step. Forward and backward; the
    recompute and gradient traffic follow :func:`dsp.sim.volume.transfers`."""
    out = _two_stage(w, a) if inter == "2-stage" else _ring_across(w, a, inter)
    if w.mode == "infer":
        return [t for t in out if t.phase == "forward"]
    if w.activation_checkpointing:
        out += [
            dataclasses.replace(t, phase="backward", what=t.what + " (recompute)")
            for t in out
            if t.phase == "forward" and t.what != "exit gather"
        ]
    return out + [t for t in transfers(w, 0) if t.phase == "sync"]


def _ring_across(w: Workload, a: int, inter: str) -> List[Transfer]:
    """The inter-node axis shards ``inter`` all step long; the stages that need it whole run
    ring attention across the nodes; DSP switches the other dim inside a node."""
    m, b = w.shape, w.sp // a
    T_b, S_b = shard_sizes(w.T, b)[0], shard_sizes(w.S, b)[0]
    # the node's part of the activation: (B, T_b, S, C) or (B, T, S_b, C), switched over a ranks
    x = Shape(
        w.batch, T_b if inter == "T" else w.T, w.S if inter == "T" else S_b, m.C, m.H, a, 0, w.elem
    )
    n_t, n_s = m.count(("attn", "T")), m.count(("attn", "S"))
    out = []
    if inter == "T":  # temporal stages: switch T->S in the node, ring over T across nodes
        sw = n_t * (switch_bytes(x, "T") + switch_bytes(x, "S"))
        rb = ring_bytes(shard_sizes(w.T, b), 0, w.batch * shard_sizes(w.S, a)[0], m.H, m.D, w.elem)
        rings, calls = n_t, 2 * n_t
    else:  # spatial stages need S whole: ring over S across nodes on T/a frames
        sw = n_t * (switch_bytes(x, "T") + switch_bytes(x, "S"))
        rb = ring_bytes(shard_sizes(w.S, b), 0, w.batch * shard_sizes(w.T, a)[0], m.H, m.D, w.elem)
        rings, calls = n_s, 2 * n_t
    gather = w.batch * shard_sizes(w.T, w.sp)[0] * w.S * m.P * w.elem * (w.sp - 1)
    out.append(Transfer("a2a", "forward", gather, 1, w.sp, "exit gather"))
    for phase in ("forward", "backward"):
        out.append(Transfer("a2a", phase, sw, calls, a, "switch (intra)"))
        ring_calls = rings * ((b - 1) if phase == "forward" else (2 * b - 1))
        out.append(
            Transfer("p2p", phase, rings * rb[phase], ring_calls, w.sp, "ring (inter)", ring=b)
        )
    return out


def _two_stage(w: Workload, a: int) -> List[Transfer]:
    """DSP whose every switch is two all-to-alls: over the ``a`` GPUs of a node (NVLink),
    then over the ``b`` nodes (InfiniBand) with the node's share. The state between them
    shards T over the nodes and S inside a node, ``(B, T/b, S/a, C)``; only ``(b-1)/b`` of a
    rank's data crosses nodes instead of ``(N-1)/N`` at the inter-node rate. Even sizes."""
    m, n, b = w.shape, w.sp, w.sp // a
    local = w.batch * w.T * w.S * m.C * w.elem / n  # one rank's activation
    n_t = m.count(("attn", "T"))
    gather = w.batch * shard_sizes(w.T, n)[0] * w.S * m.P * w.elem * (n - 1)
    out = [Transfer("a2a", "forward", gather, 1, n, "exit gather")]
    for phase in ("forward", "backward"):
        out.append(
            Transfer("a2a", phase, 2 * n_t * local * (a - 1) / a, 2 * n_t, a, "switch (intra)")
        )
        out.append(
            Transfer("a2a", phase, 2 * n_t * local * (b - 1) / b, 2 * n_t, n, "switch (inter)")
        )
    return out


def _hier_record(w: Workload, cluster: Cluster, a: int, inter: str, limit) -> Dict:
    rec = simulate(w, cluster, memory_limit=limit)  # compute, memory and sync as flat DSP
    ts = hierarchical_transfers(w, a, inter)
    sp_t = sum(transfer_time(t, cluster) for t in ts if t.phase != "sync")
    flat_sp = rec["comm_s"]["sp_s"]
    step = rec["step_time_s"]["median"] - flat_sp + sp_t
    rec.update(
        step_time_s={"median": step},
        exposed_comm_s=rec["exposed_comm_s"] - flat_sp + sp_t,
        comm_s={**rec["comm_s"], "sp_s": sp_t},
        samples_per_s=w.batch * w.dp / step,
        tokens_per_s=w.tokens * w.dp / step,
        bytes_sent_forward=sum(t.bytes for t in ts if t.phase == "forward"),
        bytes_sent_backward=sum(t.bytes for t in ts if t.phase == "backward"),
    )
    return rec


def search(
    base: Workload,
    cluster: Cluster,
    *,
    strategies: Sequence[str] = ("dsp", "ulysses", "ring", "megatron_sp", "usp"),
    sp_degrees: Optional[Sequence[int]] = None,
    memory_limit: Optional[float] = None,
    objective: str = "time",
) -> List[Dict]:
    """Every (strategy, sp, placement) on all of ``cluster``'s GPUs, best first (see the
    module doc). Each record is :func:`dsp.sim.step.simulate`'s plus ``placement`` and
    ``time_per_sample_s``; records that do not fit sort after all that do. ``objective=
    "bytes"`` ranks by the strategy's bytes per rank instead (a bytes-only planner's choice,
    for comparison)."""
    g = cluster.gpus
    degrees = sp_degrees or [d for d in range(1, g + 1) if g % d == 0]
    out = []
    for s in strategies:
        for sp in degrees:
            if sp == 1 and s != strategies[0]:
                continue  # "none" once
            try:
                w = dataclasses.replace(base, strategy=s if sp > 1 else "none", sp=sp, dp=g // sp)
                recs = [(simulate(w, cluster, memory_limit=memory_limit), "flat")]
                a = cluster.gpus_per_node
                if s == "dsp" and sp > a and sp % a == 0 and w.is_dit:
                    for inter in ("2-stage", "T", "S"):
                        rec = _hier_record(w, cluster, a, inter, memory_limit)
                        recs.append(
                            (rec, "2-stage switch" if inter == "2-stage" else f"ring over {inter}")
                        )
            except ValueError:
                continue
            for rec, placement in recs:
                rec["placement"] = placement
                rec["time_per_sample_s"] = 1 / rec["samples_per_s"]
                out.append(rec)
    if objective == "bytes":  # what a bytes-only planner would pick: fewest bytes per rank
        out.sort(key=lambda r: (not r["fits"], r["bytes_sent_forward"] + r["bytes_sent_backward"]))
    else:
        out.sort(key=lambda r: (not r["fits"], r["time_per_sample_s"]))
    return out
