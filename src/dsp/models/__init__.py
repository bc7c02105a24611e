"""Single-device video diffusion transformers (no parallel code inside).

Blocks work on ``(B, T, S, C)`` activations and read T and S from the input,
attention modules take an injectable ``core``, and position-dependent work
lives only in :class:`Attention` (frame positions are a table the parent passes in), so
parallel plans apply from outside. The same rules hold for the 3-axis axial video transformer
(:mod:`dsp.models.axial`) and the Evoformer-style protein trunk (:mod:`dsp.models.evoformer`).
Build a model by name::

    model = build_model("stdit-tiny", zero_init=False)
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Union

from torch import nn

from dsp.models.axial import AxialAttention, AxialConfig, AxialTransformer
from dsp.models.evoformer import Evoformer, EvoformerConfig
from dsp.models.latte import Latte, LatteBlock, LatteConfig
from dsp.models.layers import (
    Attention,
    CrossAttention,
    FinalLayer,
    Mlp,
    PatchEmbed3D,
    TimestepEmbedder,
    modulate,
    sdpa_core,
    sincos_1d,
    sincos_2d,
    temporal_table,
)
from dsp.models.stdit import STDiT, STDiTBlock, STDiTConfig

ModelConfig = Union[STDiTConfig, LatteConfig, AxialConfig, EvoformerConfig]

CONFIGS: Dict[str, ModelConfig] = {
    "stdit-tiny": STDiTConfig(depth=2, hidden_size=32, num_heads=4, caption_channels=16),
    "stdit-xl/2": STDiTConfig(depth=28, hidden_size=1152, num_heads=16),
    "stdit-xxl/2": STDiTConfig(depth=36, hidden_size=2048, num_heads=32),
    "latte-tiny": LatteConfig(depth=4, hidden_size=32, num_heads=4, caption_channels=16),
    "latte-xl/2": LatteConfig(depth=28, hidden_size=1152, num_heads=16),
    "axial-tiny": AxialConfig(depth=2, hidden_size=32, num_heads=4),
    "evoformer-tiny": EvoformerConfig(),
    "evoformer-af2": EvoformerConfig(
        depth=48,
        c_m=256,
        c_z=128,
        heads_msa=8,
        heads_pair=4,
        c_hidden=32,
        c_opm=32,
        c_tri=128,
        transition=4,
    ),
}

_BUILDERS = {
    STDiTConfig: STDiT,
    LatteConfig: Latte,
    AxialConfig: AxialTransformer,
    EvoformerConfig: Evoformer,
}


def list_models() -> List[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(CONFIGS)


def build_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` replace fields of its config.

    Parameters are created on the current default device, so
    ``with torch.device("meta"): build_model("stdit-xl/2")`` costs no memory.
    """
    if name not in CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    config = CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"{name}: unknown config fields {unknown}; fields: {sorted(fields)}")
    config = dataclasses.replace(config, **overrides)
    return _BUILDERS[type(config)](config)


__all__ = [
    "CONFIGS",
    "Attention",
    "AxialAttention",
    "AxialConfig",
    "AxialTransformer",
    "Evoformer",
    "EvoformerConfig",
    "CrossAttention",
    "FinalLayer",
    "Latte",
    "LatteBlock",
    "LatteConfig",
    "Mlp",
    "ModelConfig",
    "PatchEmbed3D",
    "STDiT",
    "STDiTBlock",
    "STDiTConfig",
    "temporal_table",
    "TimestepEmbedder",
    "build_model",
    "list_models",
    "modulate",
    "sdpa_core",
    "sincos_1d",
    "sincos_2d",
]
