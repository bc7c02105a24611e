"""What overlapped switches hide in a ``dsp bench`` row: the prediction of a sliced DSP row.

A bench row run with ``--chunks k`` (or ``auto``) sends the blocking row's bytes; its stages
run in slices whose transfers overlap compute. :func:`hidden_seconds` records the bench
model on the meta device, plans it as the row did (the same ``k``; for ``auto`` the same
choice, replayed from the cluster the row recorded) and sums, over its sliced stages, what
:func:`dsp.parallelize.timing.stage_time` says slicing saves on the prediction's cluster:
``T(1) - T(k)`` per stage, with the bench's slice cost and overlap (0 once ranks outnumber
the machine's cores). ``dsp simulate --from-bench`` subtracts it from the blocking step.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from dsp.sim.hardware import Cluster

__all__ = ["hidden_seconds"]


def _recording(row: dict):
    """The bench model of ``row`` recorded on meta inputs of its sizes."""
    from dsp.bench.runner import BenchConfig
    from dsp.models import build_model
    from dsp.parallelize import record

    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    cfg = BenchConfig(**{k: v for k, v in row.items() if k in fields})
    with torch.device("meta"):
        model = build_model(cfg.model, **cfg.model_overrides())
        c = model.config
        x = torch.empty(cfg.batch, c.in_channels, cfg.frames, cfg.height, cfg.width)
        y = torch.empty(cfg.batch, cfg.text_len, c.caption_channels)
        t = torch.zeros(cfg.batch)
    return record(model, (x, t, y))


def hidden_seconds(row: dict, cluster: Cluster, cores: Optional[int]) -> float:
    """Seconds per step the row's overlapped switches hide on ``cluster`` (0 for a blocking
    row, a diffusers model or one rank)."""
    options = row.get("options") or {}
    k, n = options.get("chunks"), row["world_size"]
    if k in (None, 1) or n < 2 or str(row.get("model", "")).startswith("diffusers:"):
        return 0.0
    from dsp.bench.sweep import CPU_SLICE_OVERHEAD
    from dsp.parallelize.timing import Timing, stage_time
    from dsp.sim.hardware import cluster as read_cluster
    from dsp.sim.plan_price import link_price, timing

    rec = _recording(row)
    training = row.get("mode", "train") == "train"
    if k == "auto":  # the row's own choice, replayed from the cluster it planned for
        chosen = timing(read_cluster(options["cluster"]), n, training=training)
        plan = rec.plan(n, chunks="auto", timing=chosen)
    else:
        plan = rec.plan(n, chunks=int(k))
    t = Timing(
        link_price(cluster, n),
        1.0 / cluster.gpu.flops,
        overlap=1.0 if n <= (cores or n) else 0.0,
        slice_overhead=CPU_SLICE_OVERHEAD,
        training=training,
    )
    saved = 0.0
    for st in plan.stages:
        if st.chunks and st.chunks > 1:
            blocking = dataclasses.replace(st, chunks=None)
            saved += stage_time(blocking, plan, rec.trace, rec.decl, n, t)[0]
            saved -= stage_time(st, plan, rec.trace, rec.decl, n, t)[0]
    return saved
