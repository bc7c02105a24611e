"""Sampling: a rectified-flow Euler sampler with classifier-free guidance, CFG-parallel x DSP.

>>> from dsp.sample import SampleConfig, sample
>>> result = sample(SampleConfig(checkpoint="ckpt", steps=10, cfg_scale=4, cfg_parallel=True))
>>> result.video          # (B, 3, T, H, W) in [-1, 1], the same on every rank

See docs/training.md.
"""

from dsp.sample.sampler import SampleConfig, SampleResult, sample
from dsp.sample.video import tile, to_frames, write_video
from dsp.train.flow import euler_step, flow_loss, guided, interpolate, time_grid

__all__ = [
    "SampleConfig",
    "SampleResult",
    "euler_step",
    "flow_loss",
    "guided",
    "interpolate",
    "sample",
    "tile",
    "time_grid",
    "to_frames",
    "write_video",
]
