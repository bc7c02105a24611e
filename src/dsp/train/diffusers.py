"""``dsp train --model diffusers:latte``: diffusers' Latte transformer, unchanged, in the trainer.

:class:`DiffusersVideoModel` gives a diffusers video transformer the interface the trainer
(and the sampler) call dsp's own models with: ``model(x, t, y, mask) -> velocity``, a
``config`` with ``patch_size`` and ``caption_channels``, and ``parallelize(group, strategy,
...)``, which applies :func:`dsp.integrations.diffusers.parallelize` on the sp group instead
of a strategy's ``apply`` (the declarations come from the model's class). The model is the
tiny random config of :mod:`dsp.integrations.diffusers.tiny` sized for the run: 4 latent
channels in and out (the codec's; the velocity, no learned variance), one frame-position
row per latent frame, timestep-modulated blocks (``norm_type="ada_norm_single"``, as the
released Latte-1); ``--set KEY=VALUE`` overrides its constructor arguments
(``--set num_layers=4``).

What differs from dsp's own models: the caption mask is not passed (Latte's spatial blocks
take per-frame text without a per-frame mask; a dropped caption is the null caption's
embeddings, as for the others); ``--activation-checkpointing`` and ``--data-parallel fsdp``
are refused (they wrap ``model.blocks``, which diffusers' models do not have); the plan is
the planner's for the run's shapes (``--plan auto``). ``dsp sample --checkpoint`` samples
from its checkpoints like from dsp's own models.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict

import torch
from torch import Tensor, nn

from dsp.integrations.diffusers.tiny import PREFIX, build, unprefixed

__all__ = ["TRAINABLE", "DiffusersVideoModel", "build_diffusers_model", "check_diffusers_config"]

#: The diffusers models ``dsp train`` builds (tiny names, see dsp.integrations.diffusers.tiny).
TRAINABLE = ("latte",)


class DiffusersVideoModel(nn.Module):
    """A diffusers video transformer called as ``model(x, t, y, mask)`` (dsp's models' call).

    Args:
        model: the diffusers model (called ``model(x, timestep=t, encoder_hidden_states=y,
            return_dict=False)``).
        patch_size: its ``(pt, ph, pw)``; caption_channels: the width of its text input.
    """

    def __init__(self, model: nn.Module, *, patch_size: tuple, caption_channels: int):
        super().__init__()
        self.model = model
        self.config = SimpleNamespace(
            patch_size=tuple(patch_size),
            caption_channels=caption_channels,
            in_channels=model.config.in_channels,
            out_channels=model.config.out_channels,
        )

    def _kwargs(self, t: Tensor, y: Tensor) -> Dict[str, Any]:
        return {"timestep": t, "encoder_hidden_states": y, "return_dict": False}

    def forward(self, x: Tensor, t: Tensor, y: Tensor, mask: Tensor = None) -> Tensor:
        (out,) = self.model(x, **self._kwargs(t, y))
        return out

    def parallelize(
        self, group, strategy: str, *, plan: str = "auto", example_inputs=None, **options
    ):
        """Sequence-parallelize the diffusers model on ``group`` with ``strategy``; with
        ``example_inputs`` ``(x, t, y)`` (meta tensors are enough) it plans now, else at the
        first call; ``options``: the strategy's (``chunks``, ``cluster``). Returns the
        :class:`~dsp.integrations.diffusers.DiffusersParallel`."""
        from dsp.integrations.diffusers import parallelize

        if plan != "auto":
            raise ValueError(
                f"--plan {plan}: diffusers models are planned per input shapes by the planner "
                "(--plan auto)"
            )
        example = None
        if example_inputs is not None:
            x, t, y = example_inputs
            example = (x, self._kwargs(t, y))
        return parallelize(self.model, group, strategy, example_inputs=example, **options)


def check_diffusers_config(config: Dict[str, Any]) -> str:
    """The tiny name of a ``diffusers:NAME`` training config; ValueError for what cannot train."""
    name = unprefixed(config["model"])
    if name not in TRAINABLE:
        raise ValueError(
            f"dsp train builds {', '.join(PREFIX + n for n in TRAINABLE)} of the diffusers "
            f"models; {config['model']} runs in dsp bench and under parallelize()"
        )
    if config.get("plan", "auto") != "auto":
        raise ValueError(
            f"--plan {config['plan']}: {config['model']} is planned per input shapes by the "
            "planner (--plan auto)"
        )
    for flag, bad in (
        ("--activation-checkpointing", config.get("activation_checkpointing")),
        ("--data-parallel fsdp", config.get("data_parallel") == "fsdp"),
    ):
        if bad:
            raise ValueError(
                f"{flag} is not supported for {config['model']} (it wraps model.blocks, which "
                "diffusers' models do not have); use --data-parallel ddp or manual"
            )
    return name


def build_diffusers_model(config: Dict[str, Any]) -> DiffusersVideoModel:
    """The model of a training config whose ``model`` is ``diffusers:NAME``."""
    from dsp.data import PatchCodec

    name = check_diffusers_config(config)
    codec = PatchCodec(config.get("codec_factor", 2))
    channels, frames, height, _ = codec.latent_shape(
        config["frames"], config["height"], config["width"]
    )
    overrides = {
        "in_channels": channels,
        "out_channels": channels,  # the velocity
        "video_length": frames,
        "sample_size": height,
        # timestep-modulated blocks, as the released Latte-1 (the tiny default, layer_norm,
        # leaves adaln_single.linear without a gradient, which DDP and resuming refuse)
        "norm_type": "ada_norm_single",
        **dict(config.get("model_overrides") or {}),
    }
    model, _, _ = build(
        name, dtype=torch.float32, batch=1, frames=1, height=2, width=2,
        config=overrides, seed=config.get("seed", 0),
    )  # fmt: skip
    p = model.config.patch_size
    return DiffusersVideoModel(
        model, patch_size=(1, p, p), caption_channels=model.config.caption_channels
    )
