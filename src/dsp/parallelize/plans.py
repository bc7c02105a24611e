"""Streams of the registered models, and hand-written plans that place switches as the paper.

Models are recognised by class name, so this module imports no model code. The hand plans
shard one dim at rest and put a switch pair around every stage that needs it (the paper's
placement), which is what the planner's plans are measured against.
"""

from __future__ import annotations

from typing import List, Tuple

from torch import nn

from dsp.parallelize.plan import Plan, PlanError, Stage, Stream

__all__ = ["default_streams", "hand_plan"]

VIDEO = ("B", "T", "S", "C")
AXIAL = ("B", "T", "H", "W", "C")
MSA = ("B", "M", "R", "Cm")
PAIR = ("B", "I", "J", "Cz")


def default_streams(model: nn.Module) -> Tuple[Stream, ...]:
    """The streams of a registered model (STDiT, Latte, AxialTransformer, Evoformer)."""
    kind = type(model).__name__
    if kind in ("STDiT", "Latte"):
        return (Stream("x", VIDEO, "blocks.0", "final_layer", "T"),)
    if kind == "AxialTransformer":
        return (Stream("x", AXIAL, "blocks.0", "final_layer", "T"),)
    if kind == "Evoformer":
        return (
            Stream("msa", MSA, "blocks.0", "msa_norm", "M", arg=0),
            Stream("pair", PAIR, "blocks.0", "pair_norm", "I", arg=1),
        )
    raise PlanError(
        f"no default streams for {kind}; pass streams=[Stream(name, dims, entry, exit, shard)]"
    )


def hand_plan(model: nn.Module) -> Plan:
    """The paper's placement for a registered model: one resting dim, switches around stages.

    * STDiT: T at rest; ``attn_temp`` (over T) runs on S.
    * Latte: T at rest; every temporal block runs on S.
    * Axial: T at rest; ``attn_t`` runs on H.
    * Evoformer: MSA on M and pair on I at rest (FastFold's starting layout); column
      attention and the outer-product mean run on R, incoming triangle updates and
      ending-node attention on J; every operand used whole is gathered.
    """
    kind = type(model).__name__
    streams = default_streams(model)
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
        else:
            stages += _evoformer_block(b)
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
