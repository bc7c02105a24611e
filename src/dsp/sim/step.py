"""Step time, throughput, bytes and memory of one workload on one cluster.

Time model (documented in docs/simulate.md):

* compute: the slowest rank's FLOPs (:func:`dsp.sim.flops.step_flops`) at the GPU's achieved
  FLOP/s;
* each transfer: ``calls x latency + bytes / (bandwidth x efficiency)`` on the link its group
  needs (:meth:`Cluster.link_for`), efficiency = the link's all-to-all efficiency for
  all-to-all, all-gather and reduce-scatter, its pair efficiency for the steps of a ring of
  two (each rank sends to and receives from the same peer), 1 for other point-to-point ring
  steps and ring all-reduce;
* the strategies' transfers are exposed (they sit between the modules that need them);
  gradient / parameter traffic overlaps the backward compute when ``overlap_dp`` (DDP buckets,
  ZeRO, FSDP prefetch), so only what exceeds the backward is exposed;
* step = compute + exposed communication, both of the slowest rank.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from dsp.comm.shards import shard_sizes
from dsp.sim.flops import step_flops
from dsp.sim.hardware import Cluster
from dsp.sim.memory import memory_bytes
from dsp.sim.volume import Transfer, transfers
from dsp.sim.workload import Workload

__all__ = ["comm_seconds", "compute_seconds", "transfer_time", "simulate", "simulate_many"]

_A2A = ("a2a", "all_gather", "reduce_scatter")


def transfer_time(t: Transfer, cluster: Cluster) -> float:
    """Seconds one rank spends in ``t`` on ``cluster``."""
    if t.bytes == 0:
        return 0.0
    link = cluster.link_for(t.span)
    if t.kind in _A2A:
        eff = link.a2a_efficiency
    elif t.kind == "p2p" and t.ring == 2:
        eff = link.pair_efficiency
    else:
        eff = 1.0
    return t.calls * link.latency + t.bytes / (link.bandwidth * eff)


def comm_seconds(
    cluster: Cluster, kind: str, nbytes: float, *, span: int, calls: int = 1, ring: int = 0
) -> float:
    """Seconds to send ``nbytes`` per rank in ``calls`` collectives of ``kind`` (``"a2a"``,
    ``"all_gather"``, ``"reduce_scatter"``, ``"p2p"``, ``"allreduce"``) over ``span``
    consecutive ranks (``ring``: members of a ``p2p`` ring): the hook a byte-counting planner
    calls to rank its choices by time."""
    return transfer_time(Transfer(kind, "forward", nbytes, calls, span, "", ring), cluster)


def compute_seconds(cluster: Cluster, flops: float) -> float:
    """Seconds for ``flops`` at the cluster's achieved FLOP/s per GPU."""
    return flops / cluster.gpu.flops


def _ranks(w: Workload) -> List[int]:
    """One rank per distinct set of shard sizes (ranks with equal sizes cost the same)."""
    if w.strategy == "none":
        return [0]
    if not w.closed_form:
        from dsp.sim.traced import ranks

        return ranks(w)
    t, s = w.t_sizes(), w.s_sizes()
    h, f = shard_sizes(w.shape.H, w.sp), shard_sizes(w.shape.F, w.sp)
    u = w.u if w.strategy == "usp" else w.sp
    rows = w.sp // u
    chunks = [sum(t[j * u : (j + 1) * u]) for j in range(rows)]
    h_u = shard_sizes(w.shape.H, u)
    seen: Dict[tuple, int] = {}
    for r in range(w.sp):
        row = r // u
        usp = (h_u[r % u], chunks[row], chunks[(row + 1) % rows])
        seen.setdefault((t[r], s[r], h[r], f[r], t[(r + 1) % w.sp], usp), r)
    return sorted(seen.values())


def simulate(
    w: Workload,
    cluster: Cluster,
    *,
    overlap_dp: bool = True,
    attn_bwd: float = 2.5,
    memory_limit: Optional[float] = None,
) -> Dict:
    """One record for ``w`` on ``cluster`` (field names as ``dsp bench`` where they agree).

    ``attn_bwd``: backward FLOPs of an attention core over its forward (2.5: FlashAttention).
    ``memory_limit``: bytes per GPU for ``fits`` (default: the GPU's memory).
    """
    if w.gpus > cluster.gpus:
        raise ValueError(f"{w.gpus} GPUs (sp {w.sp} x dp {w.dp}) > the cluster's {cluster.gpus}")
    ranks = _ranks(w)
    flops = {r: step_flops(w, r, attn_bwd=attn_bwd) for r in ranks}
    slow = max(ranks, key=lambda r: flops[r]["total"])
    compute = flops[slow]["total"] / cluster.gpu.flops
    backward = (flops[slow]["backward"] + flops[slow]["recompute"]) / cluster.gpu.flops
    comm: Dict[str, float] = {}
    exposed = sent_fwd = sent_bwd = sent_sync = 0.0
    for r in ranks:
        ts = transfers(w, r)
        sp_t = sum(transfer_time(t, cluster) for t in ts if t.phase != "sync")
        sync_t = sum(transfer_time(t, cluster) for t in ts if t.phase == "sync")
        ex = sp_t + (max(0.0, sync_t - backward) if overlap_dp else sync_t)
        if ex >= exposed:
            exposed = ex
            comm = {"sp_s": sp_t, "grad_sync_s": sync_t}
        sent_fwd = max(sent_fwd, sum(t.bytes for t in ts if t.phase == "forward"))
        sent_bwd = max(sent_bwd, sum(t.bytes for t in ts if t.phase == "backward"))
        sent_sync = max(sent_sync, sum(t.bytes for t in ts if t.phase == "sync"))
    mems = [memory_bytes(w, r) for r in ranks]
    mem = max(mems, key=lambda m: m["total"])
    step = compute + exposed
    limit = cluster.gpu.memory if memory_limit is None else memory_limit
    return {
        "model": w.model,
        "strategy": w.strategy,
        "world_size": w.gpus,
        "sp": w.sp,
        "dp": w.dp,
        "frames": w.frames,
        "height": w.height,
        "width": w.width,
        "batch": w.batch,
        "mode": w.mode,
        "patches": w.S if w.is_dit else None,
        **({"msa": w.msa, "residues": w.residues} if w.is_evoformer else {}),
        "tokens": w.tokens,
        "activation_checkpointing": w.activation_checkpointing,
        "dp_style": w.dp_style,
        "elem_size": w.elem,
        "cluster": cluster.name or cluster.describe(),
        "step_time_s": {"median": step},
        "compute_s": compute,
        "exposed_comm_s": exposed,
        "comm_s": comm,
        "samples_per_s": w.batch * w.dp / step,
        "tokens_per_s": w.tokens * w.dp / step,
        "flops_per_gpu": flops[slow]["total"],
        "bytes_sent_forward": sent_fwd,
        "bytes_sent_backward": sent_bwd,
        "bytes_sent_grad_sync": sent_sync,
        "saved_activation_bytes": mem["activations_saved"],
        "memory_per_gpu_bytes": mem["total"],
        "memory": mem,
        "memory_limit_bytes": limit,
        "fits": mem["total"] <= limit,
        "error": None,
    }


def simulate_many(base: Workload, cluster: Cluster, **lists) -> List[Dict]:
    """:func:`simulate` over the product of field lists (``strategy=[...], frames=[...]``);
    a configuration that cannot run (sp > heads for megatron_sp, ...) records its error."""
    import itertools

    keys = list(lists)
    rows = []
    for values in itertools.product(*(lists[k] for k in keys)):
        fields = dict(zip(keys, values))
        try:
            w = dataclasses.replace(base, **fields)
            c = cluster.with_gpus(w.gpus) if w.gpus < cluster.gpus else cluster
            rows.append(simulate(w, c))
        except ValueError as e:
            rows.append({**{k: v for k, v in fields.items()}, "error": str(e)})
    return rows
