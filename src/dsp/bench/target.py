"""The workload an emulated link stands for, and the link rate that matches it.

A CPU benchmark means something for a cluster when its communication-to-compute *time*
ratio is the cluster's. The ratio is that of a named target workload, predicted by
``dsp simulate`` (:mod:`dsp.sim`): by default STDiT-XL/2 at 64 frames x 64 x 64 spatial tokens,
bf16, on H100s (40% of peak) over InfiniBand (``ib``: every rank on its own node, 50 GB/s)
or NVLink (``nvlink``: one node, 450 GB/s), DSP on the same N, one training step without
activation checkpointing and without the gradient all-reduce (what ``dsp bench`` times).

On the CPU, the bench model's DSP step computes for ``compute_s`` (measured: every rank runs
the bench model on its share of the frames at once, without communication, and the cost
model scales that to DSP's own per-rank FLOPs) and sends ``bytes`` per rank (the formulas).
The wanted all-to-all rate is ``bytes / (ratio_target x compute_s)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from dsp.sim.flops import step_flops
from dsp.sim.hardware import cluster
from dsp.sim.step import simulate
from dsp.sim.volume import sp_bytes
from dsp.sim.workload import Workload

__all__ = ["TargetWorkload", "target_ratio", "bench_dsp_cost", "matched_rate"]


@dataclass(frozen=True)
class TargetWorkload:
    """The workload an emulated link stands for (see the module doc)."""

    model: str = "stdit-xl/2"
    frames: int = 64
    tokens_h: int = 64  # spatial tokens per frame: tokens_h x tokens_w (latent = 2x, patch 2)
    tokens_w: int = 64
    gpu: str = "h100"
    mfu: Optional[float] = None  # default: the GPU's (dsp.sim.hardware.GPUS)
    activation_checkpointing: bool = False

    def workload(self, n: int) -> Workload:
        return Workload(
            model=self.model,
            strategy="dsp",
            frames=self.frames,
            height=2 * self.tokens_h,
            width=2 * self.tokens_w,
            sp=n,
            elem=2,
            activation_checkpointing=self.activation_checkpointing,
            grad_sync=False,
        )

    def cluster(self, link: str, n: int):
        spec = f"{n}x{self.gpu}-ib" if link == "ib" else f"{n}x{self.gpu}-nvlink"
        return cluster(spec, mfu=self.mfu)

    def describe(self, link: str) -> str:
        return (
            f"{self.model} dsp, {self.frames} frames x {self.tokens_h}x{self.tokens_w} tokens, "
            f"bf16, {self.gpu} over {link}"
            + (", activation checkpointing" if self.activation_checkpointing else "")
        )


def target_ratio(link: str, n: int, target: TargetWorkload = TargetWorkload()) -> dict:
    """DSP's communication : compute time ratio of ``target`` on ``n`` GPUs over ``link``."""
    rec = simulate(target.workload(n), target.cluster(link, n), overlap_dp=False)
    return {
        "target_workload": target.describe(link),
        "target_compute_s": rec["compute_s"],
        "target_comm_s": rec["exposed_comm_s"],
        "target_ratio": rec["exposed_comm_s"] / rec["compute_s"],
    }


def bench_dsp_cost(cfg, n: int, proxy_s: float, cpu_flops: float) -> dict:
    """DSP's per-rank compute seconds and bytes for bench config ``cfg`` on ``n`` CPU ranks.

    ``proxy_s``: the measured step of the bench model on ``ceil(T / n)`` frames, every rank at
    once, without communication; ``cpu_flops``: the matmul rate per rank measured alongside.
    """
    over = {k: v for k, v in cfg.model_overrides().items() if k != "zero_init"}
    base = Workload(
        model=cfg.model,
        strategy="dsp",
        frames=cfg.frames,
        height=cfg.height,
        width=cfg.width,
        batch=cfg.batch,
        mode=cfg.mode,
        sp=n,
        text_len=cfg.text_len,
        elem=4,
        param_elem=4,
        activation_checkpointing=False,
        grad_sync=False,
        overrides=over,
    )
    proxy = dataclasses.replace(base, strategy="none", sp=1, frames=math.ceil(cfg.frames / n))
    eff = step_flops(proxy, attn_bwd=2.0)["total"] / proxy_s / cpu_flops
    flops = max(step_flops(base, r, attn_bwd=2.0)["total"] for r in range(n))
    b = max(sum(sp_bytes(base, r)[p] for p in ("forward", "backward")) for r in range(n))
    return {"efficiency": eff, "compute_s": flops / (eff * cpu_flops), "bytes": b}


def measure_proxy(pool, cfg, repeats: int = 3) -> float:
    """Fastest step (slowest rank) of ``cfg``'s model on ``ceil(T / N)`` frames, all ranks at
    once, strategy ``none``: the compute a DSP rank does, without communication. The minimum
    over ``repeats``, since load from other processes only ever slows a step down."""
    from dsp.bench.runner import rank_bench

    proxy = dataclasses.replace(
        cfg,
        strategy="none",
        world_size=pool.world_size,
        frames=math.ceil(cfg.frames / pool.world_size),
        warmup=1,
        repeats=repeats,
        grad_sync=False,
        options={},
    )
    per_rank = pool.run(rank_bench, proxy)
    return min(max(ts) for ts in zip(*(r["times"] for r in per_rank)))


def matched_rate(ratio: float, bench: dict) -> float:
    """The all-to-all rate (bytes/s) that gives the bench's DSP step the target ``ratio``."""
    return bench["bytes"] / (ratio * bench["compute_s"])
