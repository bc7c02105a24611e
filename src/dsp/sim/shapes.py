"""A registered model's shapes, read from the model itself (built on the meta device).

The cost model never hard-codes a model: it builds it with ``torch.device("meta")`` (no
memory, no init cost to speak of), walks the modules under ``blocks`` in order, and reads
widths, heads and parameter counts from them. Supported: the video diffusion transformers
whose strategies exist (STDiT, Latte: ``blocks`` of ``(B, T, S, C)`` activations and a
token-wise ``final_layer``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Tuple

import torch

from dsp.models import build_model
from dsp.models.layers import Attention, CrossAttention, Mlp

__all__ = ["ModelShape", "model_shape"]


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about a model.

    Attributes:
        name: registry name.
        C, H, D: hidden size, heads, head dim.
        F: MLP hidden units.
        caption: text embedding width before the caption projection.
        patch: the patch size ``(pt, ph, pw)``.
        patch_in: input channels x patch volume (the patch embedding's fan-in).
        P: the final layer's output channels per token.
        ops: the block modules in execution order: ``("attn", "S"|"T")``, ``("cross",)``,
            ``("mlp",)``.
        on_s: for each of ``ops``, whether DSP's placement runs it S-sharded (inside a stage
            that computes over T: STDiT's temporal attention; Latte's whole temporal block,
            its MLP included).
        depth: number of blocks.
        params: all parameters.
        tp_params: parameters Megatron-SP shards over the sp group (attention, cross-attention
            and MLP weights inside the blocks; row-parallel biases stay replicated).
    """

    name: str
    C: int
    H: int
    D: int
    F: int
    caption: int
    patch: Tuple[int, int, int]
    patch_in: int
    P: int
    ops: Tuple[tuple, ...]
    on_s: Tuple[bool, ...]
    depth: int
    params: int
    tp_params: int

    def count(self, op: tuple) -> int:
        return sum(1 for o in self.ops if o == op)


def _tp_params(model) -> int:
    n = 0
    for name, mod in model.named_modules():
        if not name.startswith("blocks."):
            continue
        if isinstance(mod, Attention):
            n += mod.qkv.weight.numel() + mod.qkv.bias.numel() + mod.proj.weight.numel()
        elif isinstance(mod, CrossAttention):
            n += sum(p.numel() for p in (mod.q.weight, mod.q.bias, mod.kv.weight, mod.kv.bias))
            n += mod.proj.weight.numel()
        elif isinstance(mod, Mlp):
            n += mod.fc1.weight.numel() + mod.fc1.bias.numel() + mod.fc2.weight.numel()
    return n


@functools.lru_cache(maxsize=64)
def _shape(name: str, overrides: Tuple[Tuple[str, object], ...]) -> ModelShape:
    with torch.device("meta"):
        model = build_model(name, **dict(overrides))
    if not hasattr(model, "blocks") or not hasattr(model, "final_layer"):
        raise ValueError(
            f"dsp simulate: {name} is not a video DiT with `blocks` and `final_layer`; the cost "
            "model covers the models the strategies run (STDiT, Latte)"
        )
    from dsp.models.plans import hand_plan

    t_stages = [st.module for st in hand_plan(model).stages if st.compute == ("T",)]
    ops, on_s = [], []
    for bname, mod in model.named_modules():
        if not bname.startswith("blocks."):
            continue
        if isinstance(mod, Attention):
            ops.append(("attn", mod.attn_dim))
        elif isinstance(mod, CrossAttention):
            ops.append(("cross",))
        elif isinstance(mod, Mlp):
            ops.append(("mlp",))
        else:
            continue
        on_s.append(any(bname == m or bname.startswith(m + ".") for m in t_stages))
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    mlp = next(
        m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, Mlp)
    )
    c = attn.proj.in_features
    conv = model.x_embedder.proj
    return ModelShape(
        name=name,
        C=c,
        H=c // attn.head_dim,
        D=attn.head_dim,
        F=mlp.fc1.out_features,
        caption=model.y_embedder.fc1.in_features,
        patch=tuple(conv.kernel_size),
        patch_in=conv.in_channels * math.prod(conv.kernel_size),
        P=model.final_layer.linear.out_features,
        ops=tuple(ops),
        on_s=tuple(on_s),
        depth=len(model.blocks),
        params=sum(p.numel() for p in model.parameters()),
        tp_params=_tp_params(model),
    )


def model_shape(name: str, **overrides) -> ModelShape:
    """The :class:`ModelShape` of registered model ``name`` (config ``overrides`` allowed)."""
    return _shape(name, tuple(sorted(overrides.items())))
