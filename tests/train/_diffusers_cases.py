"""Per-rank bodies for `dsp train --model diffusers:latte` (module-level: RankPool workers
import them)."""

from __future__ import annotations

import dsp
from dsp.train import TrainConfig, train

#: A short run of the tiny diffusers Latte: 8 frames of 16 x 16 pixels (latents 4 x 8 x 8 x 8:
#: 8 frames of 4 x 4 patches), global batch 4.
BASE = dict(model="diffusers:latte", steps=1, warmup=1, progress=False, global_batch=4)


def run(**kw):
    """Train on this rank; the losses, the collectives it sent, and the layout."""
    with dsp.comm_log() as log:
        result = train(TrainConfig(**{**BASE, **kw}))
    ops = sorted({r.op for r in log.records if r.tag != "loss"})
    return {"losses": result.losses, "ops": ops, "sent": log.bytes_sent, "layout": result.layout}
