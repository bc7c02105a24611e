"""Plans beside the models: their streams, the paper's hand placement, Megatron's weights.

Each model class carries its streams as data (``dsp_streams``) and its modules declare what
they compute over (``compute_dim``, ``dsp_declare``); :mod:`dsp.parallelize` reads both. The
hand plans here shard one dim at rest and put a switch pair around every stage that needs
it (the paper's placement), which is what the planner's plans are measured against;
:func:`tp_styles` names the column/row-parallel Linears of Megatron-SP.
"""

from __future__ import annotations

from typing import List, Tuple

from torch import nn

from dsp.parallelize.plan import ParamStyle, Plan, PlanError, Stage, Stream

__all__ = ["VIDEO", "AXIAL", "MSA", "PAIR", "hand_plan", "streams_of", "tp_styles"]

VIDEO = ("B", "T", "S", "C")
AXIAL = ("B", "T", "H", "W", "C")
MSA = ("B", "M", "R", "Cm")
PAIR = ("B", "I", "J", "Cz")


def streams_of(model: nn.Module) -> Tuple[Stream, ...]:
    """The model's ``dsp_streams``, or a clear error."""
    streams = getattr(model, "dsp_streams", None)
    if not streams:
        raise PlanError(
            f"{type(model).__name__} declares no streams; pass streams=[Stream(name, dims, "
            "entry, exit, shard)] or set a dsp_streams attribute (docs/parallelize.md)"
        )
    return tuple(streams)


def hand_plan(model: nn.Module) -> Plan:
    """The paper's placement for a model of :mod:`dsp.models`: one resting dim, switches
    around stages.

    * STDiT: T at rest; ``attn_temp`` (over T) runs on S.
    * Latte: T at rest; every temporal block runs on S.
    * Axial: T at rest; ``attn_t`` runs on H.
    * Evoformer: MSA on M and pair on I at rest (FastFold's starting layout); column
      attention and the outer-product mean run on R, incoming triangle updates and
      ending-node attention on J; every operand used whole is gathered.
    """
    kind = type(model).__name__
    streams = streams_of(model)
    stages: List[Stage] = []
    for i, block in enumerate(model.blocks):
        b = f"blocks.{i}"
        if kind == "STDiT":
            stages += [Stage(f"{b}.attn", "x", "S", "T"), Stage(f"{b}.attn_temp", "x", "T", "S")]
        elif kind == "Latte":
            stages.append(Stage(b, "x", block.attn_dim, "T" if block.attn_dim == "S" else "S"))
        elif kind == "AxialTransformer":
            stages += [
                Stage(f"{b}.attn_t", "x", "T", "H"),
                Stage(f"{b}.attn_h", "x", "H", "T"),
                Stage(f"{b}.attn_w", "x", "W", "T"),
            ]
        elif kind == "Evoformer":
            stages += _evoformer_block(b)
        else:
            raise PlanError(
                f"no hand plan for {kind}; use the planner (dsp.parallelize.plan_model)"
            )
    return Plan(streams, tuple(stages))


def _evoformer_block(b: str) -> List[Stage]:
    def gather(module: str, stream: str, dim: str) -> Stage:
        return Stage(module, stream, kind="gather_output", shard=dim)

    return [
        Stage(f"{b}.row_attn", "msa", "R", "M"),
        gather(f"{b}.row_attn.pair_bias", "pair", "I"),
        Stage(f"{b}.col_attn", "msa", "M", "R"),
        Stage(f"{b}.opm", "msa", "M", "R", out_stream="pair", out_shard="I"),
        gather(f"{b}.opm.right", "msa", "R"),
        Stage(f"{b}.tri_out", "pair", "J", "I"),
        gather(f"{b}.tri_out.right", "pair", "I"),
        Stage(f"{b}.tri_in", "pair", "I", "J"),
        gather(f"{b}.tri_in.left", "pair", "J"),
        Stage(f"{b}.tri_att_start", "pair", "J", "I"),
        gather(f"{b}.tri_att_start.bias", "pair", "I"),
        Stage(f"{b}.tri_att_end", "pair", "I", "J"),
        gather(f"{b}.tri_att_end.bias", "pair", "J"),
    ]


def tp_styles(model: nn.Module) -> List[Tuple[str, List[ParamStyle]]]:
    """Megatron-SP regions of a video DiT: ``(module, its Linears' styles)`` for every
    attention, cross-attention and MLP inside ``blocks`` (heads / hidden units split)."""
    from dsp.models.layers import Attention, CrossAttention, Mlp

    out = []
    for name, mod in model.named_modules():
        if not name.startswith("blocks."):
            continue
        if isinstance(mod, (Attention, CrossAttention)):
            d = mod.head_dim
            heads = mod.proj.in_features // d
            if isinstance(mod, Attention):
                styles = [ParamStyle(f"{name}.qkv", "column", heads, d, 3)]
            else:
                styles = [
                    ParamStyle(f"{name}.q", "column", heads, d),
                    ParamStyle(f"{name}.kv", "column", heads, d, 2),
                ]
            styles.append(ParamStyle(f"{name}.proj", "row", heads, d))
            out.append((name, styles))
        elif isinstance(mod, Mlp):
            hidden = mod.fc1.out_features
            out.append(
                (
                    name,
                    [
                        ParamStyle(f"{name}.fc1", "column", hidden),
                        ParamStyle(f"{name}.fc2", "row", hidden),
                    ],
                )
            )
    return out
