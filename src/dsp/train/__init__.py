"""Training: latent video diffusion (rectified flow) with DSP on sp and DDP/FSDP2 on dp.

>>> from dsp.train import TrainConfig, train
>>> result = train(TrainConfig(steps=20, dp=2, sp=2))   # on every rank (torchrun or a pool)
>>> result.losses                                       # the global-batch loss per step

See docs/training.md for the flags, the equality tolerance, checkpoints and multi-node runs.
"""

from dsp.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    read_meta,
    save_checkpoint,
)
from dsp.train.loop import TrainConfig, TrainResult, build_video_model, train
from dsp.train.runtime import ParallelDims, Runtime, init_runtime

__all__ = [
    "ParallelDims",
    "Runtime",
    "TrainConfig",
    "TrainResult",
    "build_video_model",
    "init_runtime",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "read_meta",
    "save_checkpoint",
    "train",
]
