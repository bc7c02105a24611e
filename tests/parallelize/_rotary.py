"""Per-rank bodies: full attention over F*S tokens with rotary tables passed as a tuple
``(cos, sin)`` and ``scaled_dot_product_attention`` called with keywords (as diffusers' Wan
does); the tables have no batch dim, so they are companions sliced with the tokens."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dsp
import dsp.parallelize as P
from dsp.parallelize import Stream

B, T, S, C, H = 2, 5, 4, 12, 3  # 20 tokens: uneven over 3 ranks on T, even on S


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x, rotary):
        cos, sin = rotary  # (1, T*S, 1, C/H) each
        q, k, v = self.qkv(x).unflatten(-1, (3, H, -1)).unbind(2)  # (B, L, H, D)
        q, k = (t * cos + t.flip(-1) * sin for t in (q, k))
        o = F.scaled_dot_product_attention(
            query=q.transpose(1, 2), key=k.transpose(1, 2), value=v.transpose(1, 2)
        )
        return x + self.out(o.transpose(1, 2).flatten(2))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Attention() for _ in range(2))
        self.head = nn.Linear(C, C)

    def forward(self, x):  # (B, T, S, C)
        L = x.shape[1] * x.shape[2]
        angle = torch.arange(L, dtype=x.dtype)[None, :, None, None] / L
        angle = angle * torch.arange(1, C // H + 1, dtype=x.dtype)
        rotary = (angle.cos(), angle.sin())
        h = x.flatten(1, 2)
        for block in self.blocks:
            h = block(h, rotary)
        return self.head(h)


STREAMS = [Stream("x", "B T S C", "blocks.0", "head", "T", layout="B (T S) C", exit_arg=0)]
DECLARE = {
    "": {"inputs": {0: "B T S C"}},
    "blocks.*": {
        "compute": ("T", "S"),
        "inputs": {0: "B (T S) C", "rotary": "1 (T S) 1 D"},
        "sdpa": "B H (T S) D",
    },
}


def equality(kind: str):
    """A ``kind`` stage on every attention equals one process with the dry run's bytes."""
    torch.manual_seed(0)
    model = Model().double()
    ref = copy.deepcopy(model)
    x = torch.randn(B, T, S, C, dtype=torch.float64)
    ref(x).square().sum().backward()
    rec = P.record(model, (x,), streams=STREAMS, declare=DECLARE)
    plan = rec.plan(dist.get_world_size(), kinds=(kind,))
    handle = dsp.parallelize(model, plan, declare=DECLARE)
    with dsp.comm_log() as log:
        out = model(x)
        out.square().sum().backward()
    handle.sync_grads()
    torch.testing.assert_close(out, ref(x), atol=1e-12, rtol=0)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0, msg=name)
    sent = log.sent("forward") + log.sent("backward")
    return {
        "sent": sent,
        "predicted": rec.cost(plan, dist.get_world_size()).total,
        "kinds": sorted({st.kind for st in plan.stages}),
    }
