"""Rectified flow (Liu et al. 2023; the SD3 / Open-Sora 1.2 objective), training and sampling.

Data ``x0`` at time 0, Gaussian noise at time 1, a straight path between them::

    x_t = (1 - t) x0 + t noise          velocity  v = dx_t/dt = noise - x0

The model predicts ``v`` from ``(x_t, 1000 t, caption)``; the loss is the mean squared error.
Sampling integrates ``dx/dt = v`` from t = 1 (noise) to t = 0 with Euler steps, with
classifier-free guidance ``v = v_uncond + scale (v_cond - v_uncond)``.
"""

from __future__ import annotations

from typing import List

from torch import Tensor

__all__ = [
    "TIME_SCALE",
    "euler_step",
    "flow_loss",
    "guided",
    "interpolate",
    "model_time",
    "time_grid",
    "velocity_target",
]

#: The model's timestep input is ``TIME_SCALE * t`` (DiT's embedder expects 0..1000).
TIME_SCALE = 1000.0


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)  # (B, 1, 1, 1, 1)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t noise`` for per-sample times ``t`` ``(B,)``."""
    tb = _bcast(t, x0)
    return (1 - tb) * x0 + tb * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target ``noise - x0``."""
    return noise - x0


def flow_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every element (computed in fp32)."""
    return (pred.float() - target.float()).square().mean()


def time_grid(steps: int) -> List[float]:
    """``steps + 1`` times from 1 down to 0, evenly spaced."""
    if steps < 1:
        raise ValueError(f"sampling needs at least one step, got {steps}")
    return [1.0 - i / steps for i in range(steps + 1)]


def euler_step(x: Tensor, v: Tensor, t: float, t_next: float) -> Tensor:
    """One Euler step of ``dx/dt = v`` from ``t`` to ``t_next`` (< t)."""
    return x + (t_next - t) * v


def guided(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``v_uncond + scale (v_cond - v_uncond)``."""
    return v_uncond + scale * (v_cond - v_uncond)


def model_time(t: Tensor) -> Tensor:
    """The model's timestep input for times ``t`` in [0, 1]."""
    return t * TIME_SCALE
