"""One configuration to cost: model, strategy, sizes, mesh, dtype, memory options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from dsp.comm.shards import shard_sizes
from dsp.models import CONFIGS, EvoformerConfig, LatteConfig, STDiTConfig
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

    Video models take ``frames x height x width`` (the axial transformer too); the Evoformer
    takes ``msa`` sequences of ``residues``. ``plan``: DSP's plan, ``"auto"`` (the planner's,
    as ``dsp bench`` and ``dsp train`` run it) or ``"hand"`` (the paper's placement).
    :attr:`closed_form` says whether the formulas of :mod:`dsp.sim.flops`, ``volume`` and
    ``memory`` cost it, or the engine itself on meta tensors (:mod:`dsp.sim.traced`).
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
    msa: int = 64
    residues: int = 64
    plan: str = "auto"

    def __post_init__(self):
        if self.model not in CONFIGS:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(sorted(CONFIGS))}")
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
        if self.plan not in ("auto", "hand"):
            raise ValueError(f"plan must be auto or hand, got {self.plan!r}")
        if not self.is_dit:  # the engine itself says what cannot run (dsp.sim.traced)
            return
        heads = self.shape.H
        need = {"ulysses": self.sp, "megatron_sp": self.sp, "usp": self.u}.get(self.strategy, 0)
        if need > heads:
            raise ValueError(f"{self.strategy} needs <= {heads} ranks over heads, got {need}")

    @property
    def shape(self) -> ModelShape:
        return model_shape(self.model, **self.overrides)

    @property
    def is_dit(self) -> bool:
        """A video DiT (``blocks`` of ``(B, T, S, C)`` and a token-wise ``final_layer``)."""
        return isinstance(CONFIGS.get(self.model), (STDiTConfig, LatteConfig))

    @property
    def is_evoformer(self) -> bool:
        return isinstance(CONFIGS.get(self.model), EvoformerConfig)

    @property
    def closed_form(self) -> bool:
        """Costed by the formulas: a video DiT, and for ``dsp`` the hand placement. On STDiT
        the planner's plan sends the same bytes over all ranks (where T shards less evenly
        than S it gathers the output along S, which moves each rank's share of the exit
        gather), so it is costed as the hand placement too; on Latte the planner rests the
        stream on S from the last temporal block on, so ``plan="auto"`` is costed by the
        engine."""
        if not self.is_dit:
            return False
        stdit = isinstance(CONFIGS[self.model], STDiTConfig)
        return self.strategy != "dsp" or self.plan == "hand" or stdit

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
        """Tokens per sp group per step (as ``dsp bench``: batch x T x S; the Evoformer: its
        MSA and pair positions, ``batch x (msa x residues + residues^2)``)."""
        config = CONFIGS[self.model]
        if isinstance(config, EvoformerConfig):
            return self.batch * (self.msa * self.residues + self.residues**2)
        if not self.is_dit:  # axial: patches of every frame
            pt, ph, pw = config.patch_size
            return self.batch * (self.frames // pt) * (self.height // ph) * (self.width // pw)
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
