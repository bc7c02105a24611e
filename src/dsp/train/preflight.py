"""Checks before the first step of :func:`dsp.train.train`: shards that fit the sp degree,
a usable ``--ckpt-dir``, and the checkpoint to resume from (the newest intact one)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from dsp.comm import collectives as C
from dsp.data import PatchCodec
from dsp.train.checkpoint import (
    check_ckpt_dir,
    checkpoint_bytes,
    describe_damage,
    intact_checkpoint,
    remove_partial,
    step_dir_name,
)
from dsp.train.runtime import Runtime, barrier_or_raise

if TYPE_CHECKING:
    from dsp.train.loop import TrainConfig

__all__ = ["check_sp_fits", "prepare_ckpt_dir"]


def check_sp_fits(cfg: TrainConfig, sp: int, model: Optional[nn.Module] = None) -> None:
    """Refuse a sequence-parallel degree larger than the token grid along a sharded dim.

    The strategies shard the patched frames (T) and the patches of a frame (S) over the sp
    ranks; every rank needs at least one of each. (The primitives handle empty shards; the
    trainer's strategies and data-parallel wrappers are not tested with them, so they are
    refused here: in the CLI before any rank starts, in train() before the first collective.)
    """
    if sp <= 1:
        return
    if model is None:
        from dsp.train.loop import build_video_model

        with torch.device("meta"):
            model = build_video_model(cfg.to_dict())
    codec = PatchCodec(cfg.codec_factor)
    _, t, h, w = codec.latent_shape(cfg.frames, cfg.height, cfg.width)
    pt, ph, pw = model.config.patch_size
    frames, patches = t // pt, (h // ph) * (w // pw)
    if frames < sp:
        raise ValueError(
            f"--frames {cfg.frames} gives {frames} patched frame(s), fewer than sp={sp} ranks: "
            f"every rank needs at least one; use --frames >= {sp * pt} or --sp <= {frames}"
        )
    if patches < sp:
        raise ValueError(
            f"--height {cfg.height} x --width {cfg.width} gives {patches} patch(es) per frame, "
            f"fewer than sp={sp} ranks; use a larger video or --sp <= {patches}"
        )


def _say(text: str) -> None:
    """A note from rank 0 for the user (stderr, never lost in the progress bar)."""
    for line in text.splitlines():
        print(f"dsp train: {line}", file=sys.stderr, flush=True)


def prepare_ckpt_dir(cfg: TrainConfig, rt: Runtime, model: nn.Module) -> Optional[Path]:
    """Rank 0: check ``--ckpt-dir`` (a writable directory with room for one checkpoint),
    remove partial saves, and pick the newest intact checkpoint to resume from (naming any
    damaged newer one). Every rank gets the decision; any failure raises on every rank."""
    step, error = -1.0, None
    if rt.is_main:
        try:
            check_ckpt_dir(cfg.ckpt_dir, checkpoint_bytes(model))
            remove_partial(cfg.ckpt_dir)
            if cfg.resume:
                ckpt, damaged = intact_checkpoint(cfg.ckpt_dir)
                if damaged:
                    _say(describe_damage(damaged, ckpt))
                if ckpt is not None:
                    step = float(int(ckpt.name.split("_")[1]))
                elif cfg.resume == "required":
                    raise FileNotFoundError(
                        f"--resume=required: no intact checkpoint in {cfg.ckpt_dir}"
                    )
                else:
                    _say(f"--resume: no checkpoint in {cfg.ckpt_dir}; starting from step 0")
        except (OSError, ValueError) as e:
            error = e
    barrier_or_raise(rt.device, error, f"checking --ckpt-dir {cfg.ckpt_dir}")
    if rt.distributed:  # rank 0's choice, to every rank
        choice = torch.tensor([step if rt.is_main else 0.0], dtype=torch.float64, device=rt.device)
        step = C.all_reduce(choice, tag="resume").item()
    if step < 0:
        return None
    return Path(cfg.ckpt_dir) / step_dir_name(int(step))
