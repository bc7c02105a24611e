"""Tiny random diffusers video models and example inputs: no downloads, any size.

Each entry of :data:`TINY` builds one declared model with random weights (seeded) and inputs
for one call of it (seeded), as the tests, ``dsp bench --model diffusers:NAME`` and
``dsp train --model diffusers:latte`` use them::

    >>> from dsp.integrations.diffusers.tiny import build
    >>> model, args, kwargs = build("latte", batch=2, frames=5, height=8, width=6)
    >>> (out,) = model(*args, **kwargs, return_dict=False)

Sizes are of the latent video ``(B, C, F, H, W)`` (before patchify; 2 x 2 patches). Options
of every builder: ``dtype``, ``batch``, ``frames``, ``height``, ``width``, ``text_len``
(caption tokens), ``config`` (overrides of the model's constructor arguments, e.g.
``{"num_layers": 4}``) and ``seed`` (of the weights; the inputs' seed is fixed). To add a
model: one function with these options returning a :class:`Tiny`, and its entry in
:data:`TINY`.

diffusers is imported when a builder runs, not when this module is imported.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional

import torch
from torch import nn

__all__ = ["PREFIX", "TINY", "Tiny", "build", "is_prefixed", "unprefixed", "vae"]


class Tiny(NamedTuple):
    """A model and the inputs of one call: ``model(*args, **kwargs, return_dict=False)``."""

    model: nn.Module
    args: tuple
    kwargs: Dict[str, Any]


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Floating-point parameters and buffers to ``dtype`` (``nn.Module.double()`` and its
    siblings: diffusers' ``ModelMixin.to(dtype)`` warns about modules kept in fp32)."""
    return model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)


def _inputs(batch, channels, frames, height, width, text_len, text_dim, dtype):
    """Latents, caption embeddings and timesteps (``[3, 500]`` for a batch of 2)."""
    g, cpu = torch.Generator().manual_seed(1), torch.device("cpu")  # also under a meta default
    x = torch.randn(batch, channels, frames, height, width, generator=g, dtype=dtype, device=cpu)
    text = torch.randn(batch, text_len, text_dim, generator=g, dtype=dtype, device=cpu)
    timestep = torch.linspace(3, 500, batch, device=cpu).long() if batch > 1 else torch.tensor([3])
    return x, text, timestep


def latte(
    *,
    dtype: torch.dtype = torch.float64,
    batch: int = 2,
    frames: int = 5,
    height: int = 8,
    width: int = 6,
    text_len: int = 7,
    config: Optional[Dict[str, Any]] = None,
    seed: int = 0,
) -> Tiny:
    """``LatteTransformer3DModel``: 2 spatial + 2 temporal blocks, 2 heads of 8, text of 16;
    timestep-modulated blocks (``ada_norm_single``, as the released Latte-1), so the per-row
    timesteps the blocks receive are used."""
    from diffusers import LatteTransformer3DModel

    kw = dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        video_length=frames,  # the frame-position table: one row per frame
        caption_channels=16,
        cross_attention_dim=16,
        norm_type="ada_norm_single",
    )
    kw.update(config or {})
    torch.manual_seed(seed)
    model = _cast(LatteTransformer3DModel(**kw), dtype)
    x, text, t = _inputs(batch, kw["in_channels"], frames, height, width, text_len,
                         kw["caption_channels"], dtype)  # fmt: skip
    return Tiny(model, (x,), {"timestep": t, "encoder_hidden_states": text})


def wan(
    *,
    dtype: torch.dtype = torch.float64,
    batch: int = 2,
    frames: int = 5,
    height: int = 8,
    width: int = 6,
    text_len: int = 7,
    config: Optional[Dict[str, Any]] = None,
    seed: int = 0,
) -> Tiny:
    """``WanTransformer3DModel``: 2 blocks, 3 heads of 8, patches 1 x 2 x 2, text of 16."""
    from diffusers import WanTransformer3DModel

    kw = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=3,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        rope_max_seq_len=max(32, frames, height, width),
    )
    kw.update(config or {})
    torch.manual_seed(seed)
    model = _cast(WanTransformer3DModel(**kw), dtype)
    x, text, t = _inputs(batch, kw["in_channels"], frames, height, width, text_len,
                         kw["text_dim"], dtype)  # fmt: skip
    return Tiny(model, (x,), {"timestep": t, "encoder_hidden_states": text})


def animatediff(
    *,
    dtype: torch.dtype = torch.float64,
    batch: int = 2,
    frames: int = 5,
    height: int = 8,
    width: int = 6,
    text_len: int = 7,
    config: Optional[Dict[str, Any]] = None,
    seed: int = 0,
) -> Tiny:
    """``UNetMotionModel``: 2 resolutions (8, 16 channels), motion modules of 2 heads; the
    text repeated per frame ``(B*F, L, 16)``, as ``AnimateDiffPipeline`` passes it."""
    from diffusers import UNetMotionModel

    kw = dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        cross_attention_dim=16,
        num_attention_heads=2,
        norm_num_groups=4,
        motion_num_attention_heads=2,
        motion_max_seq_length=max(8, frames),
    )
    kw.update(config or {})
    torch.manual_seed(seed)
    model = _cast(UNetMotionModel(**kw), dtype)
    x, text, t = _inputs(batch, kw["in_channels"], frames, height, width, text_len,
                         kw["cross_attention_dim"], dtype)  # fmt: skip
    text = text.repeat_interleave(frames, dim=0)  # per frame, as AnimateDiffPipeline passes it
    return Tiny(model, (x,), {"timestep": t, "encoder_hidden_states": text})


def svd(
    *,
    dtype: torch.dtype = torch.float64,
    batch: int = 2,
    frames: int = 5,
    height: int = 8,
    width: int = 6,
    text_len: int = 1,
    config: Optional[Dict[str, Any]] = None,
    seed: int = 0,
) -> Tiny:
    """``UNetSpatioTemporalConditionModel`` (SVD): 2 resolutions of 32 channels (its temporal
    ResNets hard-code 32 norm groups), 2 heads; the sample is ``(B, F, 8, H, W)`` (latents
    and the conditioning image's latents), the image embedding ``(B, 1, 16)``. Weights
    diffusers initializes to zero (the temporal mixing) get small random values, so every
    path carries a gradient."""
    from diffusers import UNetSpatioTemporalConditionModel

    kw = dict(
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 32),
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12,
        layers_per_block=1,
        cross_attention_dim=16,
        num_attention_heads=(2, 2),
        num_frames=frames,
    )
    kw.update(config or {})
    torch.manual_seed(seed)
    model = _cast(UNetSpatioTemporalConditionModel(**kw), dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, dtype=dtype, device=p.device) * 0.02)
    x, image, t = _inputs(batch, kw["in_channels"], frames, height, width, text_len,
                          kw["cross_attention_dim"], dtype)  # fmt: skip
    x = x.transpose(1, 2).contiguous()  # SVD takes (B, F, C, H, W)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * batch, dtype=dtype)
    kwargs = {"timestep": t.to(dtype), "encoder_hidden_states": image, "added_time_ids": ids}
    return Tiny(model, (x,), kwargs)


#: name -> builder (keyword options above) of a :class:`Tiny`.
TINY: Dict[str, Callable[..., Tiny]] = {
    "latte": latte,
    "wan": wan,
    "animatediff": animatediff,
    "svd": svd,
}


#: How the command line names them: ``diffusers:latte`` (dsp bench, dsp train).
PREFIX = "diffusers:"


def build(name: str, **options) -> Tiny:
    """``TINY[name](**options)``, with the known names in the error of an unknown one."""
    if name not in TINY:
        raise KeyError(f"no tiny diffusers model {name!r}; choose one of {', '.join(TINY)}")
    return TINY[name](**options)


def is_prefixed(model: str) -> bool:
    """Whether a command-line model name is a diffusers model (``diffusers:NAME``)."""
    return model.startswith(PREFIX)


def unprefixed(model: str) -> str:
    """``diffusers:latte`` -> ``latte``; a ValueError naming the known ones otherwise."""
    name = model[len(PREFIX) :] if is_prefixed(model) else model
    if name not in TINY:
        known = ", ".join(PREFIX + n for n in TINY)
        raise ValueError(f"unknown diffusers model {model!r}; known: {known}")
    return name


def vae(dtype: torch.dtype = torch.float64) -> nn.Module:
    """A tiny ``AutoencoderKL`` for tiny pipelines: 4 latent channels, one downsampling (16 x 24
    pixels <-> 8 x 6 latents)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
    ).to(dtype)
