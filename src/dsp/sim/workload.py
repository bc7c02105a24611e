"""One configuration to cost: model, strategy, sizes, mesh, dtype, memory options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from dsp.comm.shards import shard_sizes
from dsp.sim.shapes import ModelShape, model_shape

__all__ = ["Workload", "STRATEGIES", "DP_STYLES"]

STRATEGIES = ("none", "dsp", "ulysses", "ring", "megatron_sp", "usp")
#: How the dp x sp mesh holds parameters, gradients and optimizer state (ZeRO stages).
DP_STYLES = ("ddp", "zero1", "zero2", "fsdp")


@dataclass(frozen=True)
class Workload:
    """A training (``mode="train"``) or sampling (``"infer"``, one forward) step.

    Sizes are the latent video before patchify, as in ``dsp bench``. ``sp`` ranks share one
    sample's sequence, ``dp`` groups of them take different samples; ``batch`` is per sp
    group. ``elem`` is the activation and communication element size (2: bf16, 4: fp32);
    ``param_elem`` that of parameters and gradients; ``master_elem`` the optimizer's master
    copy and each Adam moment (0 master when parameters are already fp32).
    """

    model: str = "stdit-xl/2"
    strategy: str = "dsp"
    frames: int = 64
    height: int = 128
    width: int = 128
    batch: int = 1
    mode: str = "train"
    sp: int = 8
    dp: int = 1
    text_len: int = 120
    elem: int = 2
    param_elem: int = 2
    master_elem: int = 4
    activation_checkpointing: bool = True
    dp_style: str = "zero2"
    grad_sync: bool = True
    ulysses_degree: Optional[int] = None
    overrides: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {STRATEGIES}")
        if self.dp_style not in DP_STYLES:
            raise ValueError(f"unknown dp style {self.dp_style!r}; choose from {DP_STYLES}")
        if self.mode not in ("train", "infer"):
            raise ValueError(f"mode must be train or infer, got {self.mode!r}")
        if self.sp < 1 or self.dp < 1:
            raise ValueError(f"sp and dp must be >= 1, got sp={self.sp} dp={self.dp}")
        if self.strategy == "none" and self.sp != 1:
            raise ValueError("strategy none runs on sp = 1")
        heads = self.shape.H
        need = {"ulysses": self.sp, "megatron_sp": self.sp, "usp": self.u}.get(self.strategy, 0)
        if need > heads:
            raise ValueError(f"{self.strategy} needs <= {heads} ranks over heads, got {need}")

    @property
    def shape(self) -> ModelShape:
        return model_shape(self.model, **self.overrides)

    @property
    def T(self) -> int:
        return self.frames // self.shape.patch[0]

    @property
    def S(self) -> int:
        _, ph, pw = self.shape.patch
        return (self.height // ph) * (self.width // pw)

    @property
    def patches(self) -> int:
        return self.S

    @property
    def tokens(self) -> int:
        """Tokens per sp group per step (as ``dsp bench``: batch x T x S)."""
        return self.batch * self.T * self.S

    @property
    def gpus(self) -> int:
        return self.sp * self.dp

    @property
    def u(self) -> int:
        """USP's Ulysses degree (rows of ``u`` ranks; ring across ``sp / u`` rows)."""
        return self.ulysses_degree or self.sp

    def t_sizes(self) -> Tuple[int, ...]:
        return tuple(shard_sizes(self.T, self.sp))

    def s_sizes(self) -> Tuple[int, ...]:
        return tuple(shard_sizes(self.S, self.sp))
