"""The training loop: a latent video diffusion model on procedural data, DSP x data parallel.

Every rank runs :func:`train` with the same :class:`TrainConfig`. The world is a 2-D mesh
``(dp, sp)``: the ``sp`` ranks of a row share one micro-batch and shard its activations with
the sequence-parallel strategy (DSP by default); the ``dp`` rows take consecutive slices of
the global batch. Gradients are averaged over all ranks once (see :mod:`dsp.train.wrap`).

The data of step ``s`` is samples ``s*G .. s*G+G-1`` of :class:`~dsp.data.MovingShapes`
(videos, captions, caption dropout, noise and diffusion times all fixed by the sample index),
so every layout trains on the same global batches and the loss curves agree to rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from dsp.comm import collectives as C
from dsp.comm.shards import shard_offsets, shard_sizes
from dsp.data import CaptionEncoder, MovingShapes, PatchCodec, make_batch
from dsp.train.checkpoint import (
    load_checkpoint,
    remove_partial,
    save_checkpoint,
)
from dsp.train.flow import flow_loss, interpolate, model_time, velocity_target
from dsp.train.preflight import check_sp_fits, prepare_ckpt_dir
from dsp.train.progress import ProgressBar
from dsp.train.runtime import ParallelDims, Runtime, autocast_dtype, init_runtime
from dsp.train.wrap import (
    DATA_PARALLEL,
    apply_activation_checkpointing,
    average_gradients,
    wrap_data_parallel,
)

__all__ = ["TrainConfig", "TrainResult", "train", "build_video_model", "MODEL_KEYS"]

#: Config fields that define the model and its data; a resumed run must keep them.
MODEL_KEYS = ("model", "model_overrides", "frames", "height", "width", "codec_factor", "seed")
#: Sequence-parallel strategies that can train here (megatron_sp shards weights: tensor
#: parallelism, whose gradients must not be averaged over sp).
TRAIN_STRATEGIES = ("dsp", "ulysses", "ring", "usp", "none")


@dataclass
class TrainConfig:
    """Everything a training run depends on (the CLI flags of ``dsp train``)."""

    model: str = "stdit-tiny"
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    frames: int = 8
    height: int = 16
    width: int = 16
    codec_factor: int = 2
    global_batch: int = 4
    steps: int = 20
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.0
    dp: Optional[int] = None
    sp: Optional[int] = 1
    strategy: str = "dsp"
    #: dsp's plan: "auto" (the planner, for this run's shapes), "hand" or a plan JSON file
    plan: str = "auto"
    #: dsp's overlapped slices: a count, or "auto" (chosen per stage for ``cluster``)
    chunks: Union[int, str, None] = None
    #: the machine ``chunks="auto"`` plans for (a preset, a JSON file or Cluster fields)
    cluster: Any = None
    data_parallel: str = "ddp"
    activation_checkpointing: bool = False
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    cond_dropout: float = 0.1
    ckpt_dir: Optional[str] = None
    save_every: int = 0
    keep: int = 2
    #: False; True (or "auto"): resume from the newest intact checkpoint if there is one;
    #: "required": an error when there is none
    resume: Union[bool, str] = False
    log_every: int = 1
    progress: bool = True
    log_json: Optional[str] = None
    #: collective timeout in seconds for every group (None: ``DSP_TIMEOUT``, else 300 s)
    timeout: Optional[float] = None

    def __post_init__(self):
        if self.strategy not in TRAIN_STRATEGIES:
            extra = (
                " (megatron_sp shards the weights: tensor parallelism, not supported for "
                "training here)"
                if self.strategy == "megatron_sp"
                else ""
            )
            raise ValueError(
                f"--strategy {self.strategy!r} cannot train; choose one of "
                f"{', '.join(TRAIN_STRATEGIES)}{extra}"
            )
        if self.data_parallel not in DATA_PARALLEL:
            raise ValueError(
                f"--data-parallel must be one of {', '.join(DATA_PARALLEL)}, "
                f"got {self.data_parallel!r}"
            )
        for name in ("global_batch", "frames", "height", "width", "keep", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("steps", "warmup", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"--cond-dropout must be in [0, 1], got {self.cond_dropout}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.plan not in ("auto", "hand") and not Path(self.plan).is_file():
            raise ValueError(
                f"--plan must be auto, hand or a plan JSON file, got {self.plan!r} (no such file)"
            )
        from dsp.strategies import overlap_options

        overlap_options(self.strategy, self.chunks, self.cluster, training=True)
        if self.resume not in (False, True, "auto", "required"):
            raise ValueError(f"--resume must be auto or required, got {self.resume!r}")
        if self.resume and not self.ckpt_dir:
            raise ValueError("--resume needs --ckpt-dir")
        if self.timeout is not None:
            from dsp.mesh import parse_timeout

            self.timeout = parse_timeout(self.timeout, "--timeout")
        # the model name, its overrides and the video size, before any process starts
        try:
            with torch.device("meta"):
                model = build_video_model(self.to_dict())
        except (KeyError, TypeError) as e:
            raise ValueError(str(e).strip("'\"")) from None
        _check_shapes(model, self, PatchCodec(self.codec_factor))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What :func:`train` returns on every rank.

    Attributes:
        losses: the global-batch loss of each step run here (``start_step`` .. ``end_step-1``).
        step_times: wall seconds per step (this rank).
        tokens_per_step: latent tokens (after patchify) per global batch.
        layout: ``{"chunks", "dp", "sp", "world_size", "data_parallel", "strategy", ...}``
            (``chunks``: the slice counts of dsp's compute stages, 1 = blocking).
        checkpoint: the last checkpoint written, if any.
    """

    losses: List[float]
    start_step: int
    end_step: int
    step_times: List[float]
    tokens_per_step: int
    layout: Dict[str, Any]
    checkpoint: Optional[str] = None

    @property
    def tokens_per_s(self) -> float:
        times = self.step_times[1:] or self.step_times  # the first step warms up
        return self.tokens_per_step * len(times) / sum(times) if times else 0.0


def build_video_model(config: Dict[str, Any]) -> nn.Module:
    """The model of a training config (a :class:`TrainConfig` dict or checkpoint meta)."""
    from dsp.models import build_model

    if config["model"].startswith("diffusers:"):  # diffusers' own model (dsp.train.diffusers)
        from dsp.train.diffusers import build_diffusers_model

        return build_diffusers_model(config)
    overrides = dict(config.get("model_overrides") or {})
    overrides.setdefault("in_channels", PatchCodec.channels)
    overrides.setdefault("learn_sigma", False)
    return build_model(config["model"], **overrides)


def _check_shapes(model: nn.Module, cfg: TrainConfig, codec: PatchCodec) -> int:
    _, t, h, w = codec.latent_shape(cfg.frames, cfg.height, cfg.width)
    pt, ph, pw = model.config.patch_size
    for name, n, p in (("frames", t, pt), ("latent height", h, ph), ("latent width", w, pw)):
        if n % p:
            raise ValueError(
                f"{name} {n} (video {cfg.frames}x{cfg.height}x{cfg.width} / codec factor "
                f"{cfg.codec_factor}) is not divisible by the model's patch size {p}"
            )
    return (t // pt) * (h // ph) * (w // pw)  # tokens per sample


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr


def train(
    cfg: TrainConfig,
    *,
    storage_writer: Optional[Callable[[Path], Any]] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> TrainResult:
    """Run (or resume) training on this rank; every rank of the world calls it.

    Args:
        storage_writer: ``path -> DCP StorageWriter`` for checkpoints (tests inject faults).
        on_step: called as ``on_step(step, loss)`` after each step (1-based step count).
    """
    from datetime import timedelta

    from dsp.mesh import default_timeout, set_group_timeouts

    timeout = timedelta(seconds=cfg.timeout) if cfg.timeout else default_timeout()
    rt: Runtime = init_runtime(device=cfg.device, timeout=timeout)
    dims = ParallelDims.resolve(("dp", "sp"), (cfg.dp, cfg.sp), rt.world_size)
    dp, sp = dims["dp"], dims["sp"]
    check_sp_fits(cfg, sp)  # the same answer on every rank, before any collective
    if cfg.global_batch % dp:
        raise ValueError(
            f"--global-batch {cfg.global_batch} is not divisible by dp={dp}: every data-parallel "
            "replica must get the same number of samples for the averaged gradient to be exact"
        )
    device = rt.device

    # 1. the mesh: (dp, sp); the strategy works on the sp axis
    sp_group, dp_rank = None, 0
    if rt.distributed:
        mesh = dims.mesh(device.type, timeout)
        sp_group = mesh["sp"].get_group()
        dp_rank = mesh.get_local_rank("dp")

    # 2. the model, identical on every rank (same seed), then the strategy's hooks
    data = MovingShapes(cfg.frames, cfg.height, cfg.width, seed=cfg.seed)
    codec = PatchCodec(cfg.codec_factor)
    torch.manual_seed(cfg.seed)
    model = build_video_model(cfg.to_dict())
    text = CaptionEncoder(model.config.caption_channels, seed=cfg.seed)
    tokens_per_sample = _check_shapes(model, cfg, codec)
    model.to(device)
    slices = []
    if rt.distributed:
        from dsp.parallelize.chunks import slice_counts
        from dsp.strategies import get_strategy, meta_like, overlap_options

        amp = autocast_dtype(cfg.precision, device)  # the dtype the switches carry
        extra = overlap_options(cfg.strategy, cfg.chunks, cfg.cluster, training=True, amp=amp)
        first = make_batch(range(1), data, codec, text)  # the shapes the planner plans for
        example = meta_like(first.x0, model_time(first.t), first.y)
        if hasattr(model, "parallelize"):  # a diffusers model: its declarations, by class
            applied = model.parallelize(
                sp_group, cfg.strategy, plan=cfg.plan, example_inputs=example, **extra
            )
        else:
            applied = get_strategy(cfg.strategy, sp_group, plan=cfg.plan, **extra)
            applied.apply(model, example)
        slices = slice_counts(applied.plan)
    # 3. activation checkpointing, 4. data parallelism (DDP / FSDP2 / manual)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    module = wrap_data_parallel(model, cfg.data_parallel, device=device, world_size=rt.world_size)
    set_group_timeouts(timeout)  # groups the strategy and DDP/FSDP made too
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = autocast_dtype(cfg.precision, device)
    layout = {
        "chunks": slices,  # dsp's slice counts of its compute stages (1: blocking)
        "dp": dp,
        "sp": sp,
        "world_size": rt.world_size,
        "data_parallel": cfg.data_parallel if rt.distributed else "none",
        "strategy": cfg.strategy if rt.distributed else "none",
        "device": str(device),
        "precision": str(amp or torch.float32).replace("torch.", ""),
    }

    # 5. resume
    start = 0
    resume_from = prepare_ckpt_dir(cfg, rt, model) if cfg.ckpt_dir else None
    if resume_from is not None:
        meta = load_checkpoint(resume_from, module, optimizer, verify=False)
        saved = meta.get("config", {})
        changed = [k for k in MODEL_KEYS if k in saved and saved[k] != getattr(cfg, k)]
        if changed:
            raise ValueError(
                "cannot resume: the checkpoint was trained with different "
                + ", ".join(f"{k}={saved[k]!r} (now {getattr(cfg, k)!r})" for k in changed)
            )
        start = int(meta["step"])

    # 6. the loop
    rows = shard_sizes(cfg.global_batch, dp)[dp_rank]
    first = shard_offsets(cfg.global_batch, dp)[dp_rank]
    bar = ProgressBar(
        cfg.steps, start=start, enabled=cfg.progress and rt.is_main, every=cfg.log_every
    )
    losses: List[float] = []
    times: List[float] = []
    last_ckpt = None
    meta_out = {"config": cfg.to_dict(), "layout": layout}
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            base = step * cfg.global_batch + first
            batch = make_batch(
                range(base, base + rows), data, codec, text, cond_dropout=cfg.cond_dropout
            ).to(device)
            x_t = interpolate(batch.x0, batch.noise, batch.t)
            ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
            with ctx:
                pred = module(x_t, model_time(batch.t), batch.y, batch.mask)
            loss = flow_loss(pred, velocity_target(batch.x0, batch.noise))
            loss.backward()
            if cfg.data_parallel == "manual":
                average_gradients(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # the global loss: the sp ranks of a row hold the same value, so the world mean
            # is the mean over the dp micro-batches (equal sizes)
            value = loss.detach().reshape(1).clone()
            if rt.distributed:
                C.all_reduce(value, tag="loss").div_(rt.world_size)
            loss_value = float(value.item())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"step {step + 1}: loss is {loss_value}")
            losses.append(loss_value)
            times.append(time.perf_counter() - t0)
            done = step + 1
            bar.update(done, loss_value, lr, tokens_per_sample * cfg.global_batch / times[-1])
            if on_step is not None:
                on_step(done, loss_value)
            if cfg.ckpt_dir and (
                (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps
            ):
                last_ckpt = save_checkpoint(
                    cfg.ckpt_dir,
                    done,
                    module,
                    optimizer,
                    meta_out,
                    rank=rt.rank,
                    device=device,
                    keep=cfg.keep,
                    storage_writer=storage_writer,
                )
    except KeyboardInterrupt:
        if cfg.ckpt_dir and rt.is_main:  # a save Ctrl-C interrupted is never read: remove it
            remove_partial(cfg.ckpt_dir)
        raise
    finally:
        bar.close()
    result = TrainResult(
        losses=losses,
        start_step=start,
        end_step=start + len(losses),
        step_times=times,
        tokens_per_step=tokens_per_sample * cfg.global_batch,
        layout=layout,
        checkpoint=str(last_ckpt) if last_ckpt else None,
    )
    if cfg.log_json and rt.is_main:
        out = {**dataclasses.asdict(result), "tokens_per_s": result.tokens_per_s}
        Path(cfg.log_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.log_json).write_text(json.dumps(out, indent=2))
    return result
