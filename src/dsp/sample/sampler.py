"""Rectified-flow sampling with classifier-free guidance, CFG-parallel x DSP.

The world is a 2-D mesh ``(cfg, sp)``:

* ``cfg = 2`` (``cfg_parallel``): the ranks with ``cfg`` coordinate 0 evaluate the model on
  the prompts, those with coordinate 1 on the null captions, at the same time; after each
  evaluation one all-gather over the ``cfg`` axis (2 ranks) hands both velocities to every
  rank, which all apply the same guided Euler step;
* ``cfg = 1``: every rank evaluates both, one after the other;
* ``sp``: each evaluation runs with the sequence-parallel strategy (DSP) on the ``sp`` ranks.

Every rank starts from the same noise (seeded) and applies the same update, so all ranks end
with the same video. Per-sample work matches a single process exactly: the conditional and
unconditional passes are separate forward calls of batch B there too (never one batch of
2B), so cfg-parallel alone is bit-identical to one process and DSP adds only the rounding of
differently shaped matmuls.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor

from dsp.comm import collectives as C
from dsp.comm.log import comm_log
from dsp.data import CaptionEncoder, PatchCodec
from dsp.data.seeds import sample_seed
from dsp.train.flow import euler_step, guided, model_time, time_grid
from dsp.train.runtime import ParallelDims, autocast_dtype, init_runtime

__all__ = ["SampleConfig", "SampleResult", "sample"]


@dataclass
class SampleConfig:
    """What ``dsp sample`` does (its flags).

    Without ``checkpoint`` a randomly initialised ``model`` samples (a smoke test of the
    machinery; the video is noise-like). With one, the model, video size and text table come
    from the checkpoint's ``meta.json``.
    """

    checkpoint: Optional[str] = None
    model: str = "stdit-tiny"
    #: the random model's config overrides (``dsp sample --set``), e.g. ``{"hidden_size": 256}``
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    #: the random model's video (pixels; the latent is ``frames x height/2 x width/2``)
    frames: int = 8
    height: int = 16
    width: int = 16
    prompts: List[str] = field(default_factory=lambda: ["red circle left"])
    steps: int = 10
    cfg_scale: float = 4.0
    cfg_parallel: bool = False
    strategy: str = "dsp"
    #: dsp's plan: "auto" (the planner, for these shapes), "hand" or a plan JSON file
    plan: str = "auto"
    #: dsp's overlapped slices: a count, or "auto" (chosen per stage for ``cluster``)
    chunks: Union[int, str, None] = None
    #: the machine ``chunks="auto"`` plans for (a preset, a JSON file or Cluster fields)
    cluster: Any = None
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"
    #: collective timeout in seconds for every group (None: ``DSP_TIMEOUT``, else 300 s)
    timeout: Optional[float] = None

    def __post_init__(self):
        if self.timeout is not None:
            from dsp.mesh import parse_timeout

            self.timeout = parse_timeout(self.timeout, "--timeout")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if not self.prompts:
            raise ValueError("give at least one --prompt")
        if self.strategy == "megatron_sp":
            raise ValueError("--strategy megatron_sp shards weights; sample with dsp or another")


@dataclass
class SampleResult:
    """Sampled latents and video (CPU, float32) and timings of every rank.

    Attributes:
        latents: ``(B, C, T, h, w)``; video: ``(B, 3, T, H, W)`` in [-1, 1].
        layout: ``{"chunks", "cfg", "sp", "world_size", "strategy", "device", "precision"}``
            (``chunks``: the slice counts of dsp's compute stages, 1 = blocking).
        ranks: per global rank ``{"total_s", "model_ms", "exchange_ms", "bytes_per_step"}``
            (``model_ms`` and ``exchange_ms`` per sampling step).
    """

    latents: Tensor
    video: Tensor
    layout: Dict[str, Any]
    ranks: List[Dict[str, float]]
    steps: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample(cfg: SampleConfig) -> SampleResult:
    """Sample ``len(cfg.prompts)`` videos; every rank of the world calls it."""
    from datetime import timedelta

    from dsp.mesh import default_timeout, set_group_timeouts
    from dsp.train.checkpoint import META, describe_damage, intact_checkpoint, load_checkpoint
    from dsp.train.loop import TrainConfig, build_video_model, check_sp_fits

    timeout = timedelta(seconds=cfg.timeout) if cfg.timeout else default_timeout()
    rt = init_runtime(device=cfg.device, timeout=timeout)
    device = rt.device
    if cfg.cfg_parallel:
        if rt.world_size % 2:
            raise ValueError(
                f"--cfg-parallel runs cond and uncond on two halves of the ranks: the world size "
                f"must be even, got {rt.world_size}"
            )
        dims = ParallelDims((2, rt.world_size // 2), ("cfg", "sp"), rt.world_size)
    else:
        dims = ParallelDims((1, rt.world_size), ("cfg", "sp"), rt.world_size)

    # the model: from a checkpoint (its config), else random (seeded, no zero init)
    if cfg.checkpoint:
        ckpt, damaged = intact_checkpoint(cfg.checkpoint)
        if ckpt is None:
            why = f"; {describe_damage(damaged, None)}" if damaged else ""
            raise FileNotFoundError(f"no intact checkpoint in {cfg.checkpoint}{why}")
        tcfg = json.loads((ckpt / META).read_text())["config"]
        check_sp_fits(TrainConfig(**{**tcfg, "resume": False, "ckpt_dir": None}), dims["sp"])
        model = build_video_model(tcfg)
        load_checkpoint(ckpt, model, None, verify=False)
        frames, height, width = tcfg["frames"], tcfg["height"], tcfg["width"]
        codec, text_seed = PatchCodec(tcfg["codec_factor"]), tcfg["seed"]
    else:
        check_sp_fits(TrainConfig(model=cfg.model, model_overrides=cfg.model_overrides,
                                  frames=cfg.frames, height=cfg.height, width=cfg.width),
                      dims["sp"])  # fmt: skip
        torch.manual_seed(cfg.seed)
        overrides = {"zero_init": False, **cfg.model_overrides}
        model = build_video_model({"model": cfg.model, "model_overrides": overrides})
        frames, height, width = cfg.frames, cfg.height, cfg.width
        codec, text_seed = PatchCodec(2), cfg.seed
    model.eval().to(device)

    text = CaptionEncoder(model.config.caption_channels, seed=text_seed)
    b = len(cfg.prompts)
    y_c, m_c = text.prompts(cfg.prompts, device=device)
    y_u, m_u = text.null(b, device=device)
    shape = (b, *codec.latent_shape(frames, height, width))
    g = torch.Generator().manual_seed(sample_seed(cfg.seed, "sample", 0))
    x = torch.randn(shape, generator=g).to(device)  # the same noise on every rank

    cfg_group = None
    cfg_rank = 0
    slices = []
    if rt.distributed:
        from dsp.parallelize.chunks import slice_counts
        from dsp.strategies import get_strategy, meta_like, overlap_options

        mesh = dims.mesh(device.type, timeout)
        cfg_group, cfg_rank = mesh["cfg"].get_group(), mesh.get_local_rank("cfg")
        example = meta_like(x, model_time(torch.zeros(b, device=device)), y_c)
        amp = autocast_dtype(cfg.precision, device)  # the dtype the switches carry
        extra = overlap_options(cfg.strategy, cfg.chunks, cfg.cluster, training=False, amp=amp)
        if hasattr(model, "parallelize"):  # trained from diffusers: its declarations, by class
            applied = model.parallelize(mesh["sp"].get_group(), cfg.strategy, plan=cfg.plan,
                                        example_inputs=example, **extra)  # fmt: skip
        else:
            applied = get_strategy(cfg.strategy, mesh["sp"].get_group(), plan=cfg.plan, **extra)
            applied.apply(model, example)
        slices = slice_counts(applied.plan)
        set_group_timeouts(timeout)  # groups the strategy made too
    amp = autocast_dtype(cfg.precision, device)

    def forward(x: Tensor, t: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
        with ctx:
            return model(x, t, y, mask).float()

    grid = time_grid(cfg.steps)
    model_s = exchange_s = 0.0
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad(), comm_log() as log:
        for t, t_next in zip(grid[:-1], grid[1:]):
            tt = model_time(torch.full((b,), t, device=device))
            t0 = time.perf_counter()
            if dims["cfg"] == 2:
                mine = (y_c, m_c) if cfg_rank == 0 else (y_u, m_u)
                v_mine = forward(x, tt, *mine)
                _sync(device)
                t1 = time.perf_counter()
                n = v_mine.numel()
                both = C.all_gather(v_mine.reshape(-1), [n, n], cfg_group, tag="cfg")
                v_c, v_u = both.view(2, *v_mine.shape).unbind(0)  # cfg rank 0: cond, 1: uncond
                _sync(device)
                exchange_s += time.perf_counter() - t1
                model_s += t1 - t0
            else:
                v_c = forward(x, tt, y_c, m_c)
                v_u = forward(x, tt, y_u, m_u)
                _sync(device)
                model_s += time.perf_counter() - t0
            x = euler_step(x, guided(v_c, v_u, cfg.cfg_scale), t, t_next)
    _sync(device)
    total = time.perf_counter() - start
    bytes_per_step = log.bytes_sent / cfg.steps

    # every rank's timings, for the latency table
    mine_stats = torch.tensor(
        [total, 1e3 * model_s / cfg.steps, 1e3 * exchange_s / cfg.steps, bytes_per_step],
        dtype=torch.float64,
        device=device,
    )
    if rt.distributed:
        all_stats = C.all_gather(mine_stats, [4] * rt.world_size, None, tag="stats")
        all_stats = all_stats.view(rt.world_size, 4).cpu().tolist()
    else:
        all_stats = [mine_stats.cpu().tolist()]
    ranks = [
        {"total_s": s[0], "model_ms": s[1], "exchange_ms": s[2], "bytes_per_step": s[3]}
        for s in all_stats
    ]
    latents = x.float().cpu()
    layout = {
        "chunks": slices,  # dsp's slice counts of its compute stages (1: blocking)
        "cfg": dims["cfg"],
        "sp": dims["sp"],
        "world_size": rt.world_size,
        "strategy": cfg.strategy if rt.distributed else "none",
        "device": str(device),
        "precision": str(amp or torch.float32).replace("torch.", ""),
    }
    video = codec.decode(latents).clamp(-1, 1)
    return SampleResult(latents, video, layout, ranks, cfg.steps)
