"""DSP on a video model written the way real code is: frames folded into the batch.

``FoldedVideo`` follows diffusers' Latte: spatial blocks run on ``(B*F, S, C)``, the parent's
forward reshapes to ``(B*S, F, C)`` for temporal blocks and back, per-row timestep
conditioning goes in as a keyword argument, a frame-position buffer is added in the
parent's forward, a 3x3 convolution mixes the patch grid, and one attention attends over
all F*S tokens of a sample. Nothing in it knows about dsp: the declarations below (data)
are all a user writes. Run it (3 CPU processes, gloo): python docs/examples/parallelize_folded.py
"""

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dsp
import dsp.parallelize
from dsp.launch import spawn
from dsp.parallelize import Stream


class SelfAttention(nn.Module):
    """Multi-head self-attention over dim 1 of (N, L, C), through torch's SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        n, length, c = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, L, D)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, c))


class Block(nn.Module):
    """adaLN-modulated attention + MLP on (N, L, C), conditioned per row by ``timestep``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(dim, 2 * dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None):
        shift, scale = self.ada(timestep)[:, None].chunk(2, dim=-1)  # (N, 1, C) each
        hidden_states = hidden_states + self.attn(self.norm(hidden_states) * (1 + scale) + shift)
        return hidden_states + self.mlp(hidden_states)


class GridConv(nn.Module):
    """A 3x3 convolution over the h x w patch grid of each frame: (N, S, C) in and out."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, hidden_states, height, width):
        n, s, c = hidden_states.shape
        grid = hidden_states.transpose(1, 2).reshape(n, c, height, width)
        return hidden_states + self.conv(grid).flatten(2).transpose(1, 2)


class FoldedVideo(nn.Module):
    """(B, Cin, F, H, W) video + (B,) timesteps -> (B, Cin, F, H, W)."""

    def __init__(self, cin=3, dim=16, heads=4, depth=2, frames=5, patch=2):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(cin, dim, patch, patch)
        self.t_embed = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.spatial = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.temporal = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        pos = torch.arange(frames)[:, None] / 10 ** (torch.arange(dim)[None] / dim)
        self.register_buffer("temp_pos", torch.sin(pos)[None])  # (1, F, C)
        self.mix = GridConv(dim)
        self.full = SelfAttention(dim, heads)
        self.out = nn.Linear(dim, cin * patch * patch)

    def forward(self, x, timestep):
        b, cin, f, hp, wp = x.shape
        x = self.embed(x.permute(0, 2, 1, 3, 4).reshape(b * f, cin, hp, wp))  # (B*F, C, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B*F, S, C)
        t = self.t_embed(timestep[:, None].to(x.dtype))  # (B, C)
        t_spatial = t.repeat_interleave(f, dim=0)  # (B*F, C)
        t_temporal = t.repeat_interleave(h * w, dim=0)  # (B*S, C)
        for i, (spatial, temporal) in enumerate(zip(self.spatial, self.temporal)):
            x = spatial(x, None, timestep=t_spatial)
            x = x.reshape(b, -1, x.shape[-2], x.shape[-1]).permute(0, 2, 1, 3)  # (B, S, F, C)
            x = x.reshape(-1, x.shape[-2], x.shape[-1])  # (B*S, F, C)
            if i == 0:
                x = x + self.temp_pos
            x = temporal(x, None, timestep=t_temporal)
            x = x.reshape(b, -1, x.shape[-2], x.shape[-1]).permute(0, 2, 1, 3)  # (B, F, S, C)
            x = x.reshape(-1, x.shape[-2], x.shape[-1])  # (B*F, S, C)
        x = self.mix(x, height=h, width=w)
        x = x + self.full(x.reshape(b, -1, x.shape[-1])).reshape(x.shape)  # all F*S tokens
        x = self.out(x)  # (B*F, S, p*p*Cin)
        x = x.reshape(b, f, h, w, self.patch, self.patch, cin).permute(0, 6, 1, 2, 4, 3, 5)
        return x.reshape(b, cin, f, hp, wp)


# --- what a user declares: layouts of the model's own tensors (no change to its code) ----
STREAMS = [
    Stream(
        "x",
        "B F S C",
        entry="spatial.0",
        exit="out",
        shard="F",
        arg="hidden_states",
        layout="(B F) S C",
    ),
]
DECLARE = {
    "": {"inputs": {"x": "B Cin F Hp Wp"}, "buffers": {"temp_pos": "1 F C"}},
    "spatial.*": {"inputs": {"hidden_states": "(B F) S C", "timestep": "(B F) D"}},
    "temporal.*": {"inputs": {"hidden_states": "(B S) F C", "timestep": "(B S) D"}},
    "spatial.*.attn": {"compute": "S", "inputs": {0: "(B F) S C"}, "sdpa": "(B F) H S D"},
    "temporal.*.attn": {"compute": "F", "inputs": {0: "(B S) F C"}, "sdpa": "(B S) H F D"},
    "mix": {"compute": "S", "inputs": {"hidden_states": "(B F) S C"}},
    "full": {"compute": ("F", "S"), "inputs": {0: "B (F S) C"}, "sdpa": "B H (F S) D"},
}
# ------------------------------------------------------------------------------------------


def make(seed: int = 0):
    """The model and its inputs, in float64: B = 2, F = 5 frames, 4 x 3 patches (uneven)."""
    torch.manual_seed(seed)
    model = FoldedVideo().double()
    x = torch.randn(2, 3, 5, 8, 6, dtype=torch.float64)
    return model, (x, torch.tensor([0.3, 0.7], dtype=torch.float64))


def check(kinds=None):
    """Plan with the planner, parallelize, compare with one process; return what happened."""
    n, rank = dist.get_world_size(), dist.get_rank()
    model, inputs = make()
    ref = copy.deepcopy(model)
    ref(*inputs).square().sum().backward()
    rec = dsp.parallelize.record(model, inputs, streams=STREAMS, declare=DECLARE)
    plan = rec.plan(n, kinds=kinds)
    predicted = rec.cost(plan, n)
    handle = dsp.parallelize(model, plan, declare=DECLARE)
    with dsp.comm_log() as log:
        model(*inputs).square().sum().backward()
    handle.sync_grads()
    equal = math.isclose(
        0,
        max(
            (a.grad - b.grad).abs().max().item()
            for a, b in zip(model.parameters(), ref.parameters())
        ),
        abs_tol=1e-9,
    )
    return {
        "rank": rank,
        "plan": str(plan),
        "equal": equal,
        "sent": log.sent("forward") + log.sent("backward"),
        "predicted": predicted.total,
    }


def main():
    results = spawn(check, 3)
    print(results[0]["plan"])
    print("equal to one process:", "yes" if all(r["equal"] for r in results) else "NO")
    for r in results:
        print(f"rank {r['rank']}: sent {r['sent']} bytes")
    print(f"all ranks: {sum(r['sent'] for r in results)} bytes, dry run: {results[0]['predicted']}")


if __name__ == "__main__":
    main()
