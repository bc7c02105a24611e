"""Moving shapes: a procedural text-to-video data set, each video a function of its index.

A video shows one shape (square, circle or diamond) of one colour moving left, right, up or
down at a constant speed over a black background, wrapping around the edges (so it never
leaves the frame). Its caption is the three words ``"<colour> <shape> <motion>"``. Position,
size and speed are random per video; everything is drawn from a generator seeded by
``(seed, index)`` alone, so sample ``i`` is the same on every rank, in every process layout,
on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import Tensor

from dsp.data.seeds import sample_seed

__all__ = ["COLORS", "SHAPES", "MOTIONS", "ShapeSpec", "MovingShapes"]

#: Colour name -> RGB in [0, 1].
COLORS: Dict[str, Tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 1.0, 0.15),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 1.0, 0.15),
    "magenta": (1.0, 0.15, 1.0),
    "cyan": (0.15, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
SHAPES: Tuple[str, ...] = ("square", "circle", "diamond")
#: Motion name -> (dx, dy) direction in pixels per frame (times the speed).
MOTIONS: Dict[str, Tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}


@dataclass(frozen=True)
class ShapeSpec:
    """What one video shows: caption words, start centre (pixels), radius and speed."""

    color: str
    shape: str
    motion: str
    x0: float
    y0: float
    radius: float
    speed: float

    @property
    def caption(self) -> str:
        return f"{self.color} {self.shape} {self.motion}"


class MovingShapes:
    """An endless, deterministic data set of ``(3, frames, height, width)`` videos in [-1, 1].

    Args:
        frames, height, width: video size in frames and pixels.
        seed: data seed; video ``i`` depends on ``(seed, i)`` only.
    """

    def __init__(self, frames: int, height: int, width: int, *, seed: int = 0):
        if min(frames, height, width) < 1:
            raise ValueError(
                f"MovingShapes: frames, height and width must be >= 1, got "
                f"{frames}, {height}, {width}"
            )
        self.frames, self.height, self.width, self.seed = frames, height, width, seed

    def spec(self, index: int) -> ShapeSpec:
        """The random choices of video ``index``."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, "video", index))
        u = torch.rand(7, generator=g, dtype=torch.float64).tolist()
        colors = list(COLORS)
        motions = list(MOTIONS)
        side = min(self.height, self.width)
        return ShapeSpec(
            color=colors[int(u[0] * len(colors))],
            shape=SHAPES[int(u[1] * len(SHAPES))],
            motion=motions[int(u[2] * len(motions))],
            x0=u[3] * self.width,
            y0=u[4] * self.height,
            radius=side * (0.12 + 0.13 * u[5]),  # 12% .. 25% of the shorter side
            speed=1.0 + u[6],  # 1 .. 2 pixels per frame
        )

    def render(self, spec: ShapeSpec) -> Tensor:
        """The video of ``spec``: ``(3, T, H, W)`` float32, background -1, shape colour."""
        t = torch.arange(self.frames, dtype=torch.float64)[:, None, None]  # (T, 1, 1)
        py = torch.arange(self.height, dtype=torch.float64)[None, :, None] + 0.5  # (1, H, 1)
        px = torch.arange(self.width, dtype=torch.float64)[None, None, :] + 0.5  # (1, 1, W)
        vx, vy = MOTIONS[spec.motion]
        cx = spec.x0 + vx * spec.speed * t  # (T, 1, 1)
        cy = spec.y0 + vy * spec.speed * t
        # offsets on the torus: the shape wraps around the edges
        dx = torch.remainder(px - cx + self.width / 2, self.width) - self.width / 2  # (T, 1, W)
        dy = torch.remainder(py - cy + self.height / 2, self.height) - self.height / 2
        if spec.shape == "square":
            inside = torch.maximum(dx.abs(), dy.abs()) <= spec.radius
        elif spec.shape == "circle":
            inside = dx.square() + dy.square() <= spec.radius**2
        else:  # diamond
            inside = dx.abs() + dy.abs() <= spec.radius * 1.3
        inside = inside.expand(self.frames, self.height, self.width)  # (T, H, W)
        rgb = torch.tensor(COLORS[spec.color], dtype=torch.float32) * 2 - 1  # [-1, 1]
        video = torch.full((3, self.frames, self.height, self.width), -1.0)
        return torch.where(inside[None], rgb[:, None, None, None], video)  # (3, T, H, W)

    def __getitem__(self, index: int) -> Tuple[Tensor, ShapeSpec]:
        spec = self.spec(index)
        return self.render(spec), spec
