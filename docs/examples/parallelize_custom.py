"""DSP on a model that dsp knows nothing about: a traffic forecaster over (B, T, V, C).

Attention over time (T steps) and over the road network (V sensors) alternate, as in
spatio-temporal forecasting. The model is plain PyTorch; dsp.parallelize is told which module
needs which dim whole, plans where to shard and switch, and applies the plan with hooks.
Run it (2 CPU processes, gloo): python docs/examples/parallelize_custom.py
"""

import copy

import torch
import torch.distributed as dist
from torch import nn

import dsp
import dsp.parallelize
from dsp.launch import spawn
from dsp.parallelize import Stream


class AxisAttention(nn.Module):
    """Self-attention along dim ``axis`` of (B, T, V, C); the other sequence dim is batch."""

    def __init__(self, dim: int, heads: int, axis: int):
        super().__init__()
        self.axis = axis
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        x = x.movedim(self.axis, 2)  # (B, other, L, C)
        b, other, length, c = x.shape
        seq = x.reshape(b * other, length, c)
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        return out.reshape(b, other, length, c).movedim(2, self.axis)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_time, self.time = nn.LayerNorm(dim), AxisAttention(dim, heads, axis=1)
        self.norm_space, self.space = nn.LayerNorm(dim), AxisAttention(dim, heads, axis=2)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.time(self.norm_time(x))  # over T, for each sensor
        x = x + self.space(self.norm_space(x))  # over V, for each time step
        return x + self.mlp(self.norm_mlp(x))


class Forecaster(nn.Module):
    """(B, T, V, features) -> next-step features for every step and sensor."""

    def __init__(self, features: int = 3, dim: int = 32, heads: int = 4, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, features)

    def forward(self, x):
        x = self.embed(x)  # (B, T, V, C)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# What dsp needs to know, as data: the activation's dims, where the sharded region starts
# and ends, and which modules need which dim whole (fnmatch patterns over module names).
STREAMS = [Stream("x", dims=("B", "T", "V", "C"), entry="blocks.0", exit="head", shard="T")]
COMPUTE = {"blocks.*.time": "T", "blocks.*.space": "V"}


def main():
    """One training step on every rank; compare with the same step in one process."""
    n = dist.get_world_size()
    torch.manual_seed(0)
    model = Forecaster().double()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 12, 30, 3, dtype=torch.float64)  # 12 steps, 30 sensors

    plan = dsp.parallelize.plan_model(model, (x,), n, streams=STREAMS, compute=COMPUTE)
    handle = dsp.parallelize(model, plan)  # hooks; Forecaster's code is unchanged
    with dsp.comm_log() as log:
        out = model(x)  # the full output on every rank
        out.square().mean().backward()
    handle.sync_grads()  # mean all-reduce of the gradients

    reference(x).square().mean().backward()
    ref = dict(reference.named_parameters())
    error = max((p.grad - ref[k].grad).abs().max().item() for k, p in model.named_parameters())
    return {"plan": plan, "error": error, "bytes": log.bytes_sent}


if __name__ == "__main__":
    results = spawn(main, 2)
    plan = results[0]["plan"]
    print(plan)  # a table; plans are plain data
    assert dsp.parallelize.Plan.from_json(plan.to_json()) == plan
    for rank, r in enumerate(results):
        print(f"rank {rank}: sent {r['bytes']} bytes, max gradient error {r['error']:.1e}")
    assert all(r["error"] < 1e-10 for r in results)
    print("equal to one process: yes")
