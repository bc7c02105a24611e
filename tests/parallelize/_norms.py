"""Per-rank bodies: group norms whose statistics span a sharded dim."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dsp
from dsp.comm.shards import shard_sizes
from dsp.parallelize.norms import NormMode, norm_bytes


def _sum(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


def group_norm_on_row_shards(shape=(2, 6, 5, 7, 3), groups=3, dim=3):
    """``F.group_norm`` of a ``(B, C, F, H, W)`` tensor sharded on ``dim`` (rows) equals one
    process's, forward and backward; the bytes are :func:`norm_bytes`'s."""
    rank, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
    w = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_()
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = F.group_norm(x, groups, w, b, 1e-6)
    (ref * up).sum().backward()
    gx, gw, gb = x.grad.clone(), w.grad.clone(), b.grad.clone()
    lens = shard_sizes(shape[dim], n)
    start = sum(lens[:rank])
    xs = x.detach().narrow(dim, start, lens[rank]).clone().requires_grad_()
    w.grad = b.grad = None
    with dsp.comm_log() as log:
        with NormMode(None, "test norm"):
            out = F.group_norm(xs, groups, w, b, 1e-6)
        (out * up.narrow(dim, start, lens[rank])).sum().backward()
    torch.testing.assert_close(out, ref.narrow(dim, start, lens[rank]), atol=1e-12, rtol=0)
    torch.testing.assert_close(xs.grad, gx.narrow(dim, start, lens[rank]), atol=1e-12, rtol=0)
    torch.testing.assert_close(_sum(w.grad), gw, atol=1e-10, rtol=0)
    torch.testing.assert_close(_sum(b.grad), gb, atol=1e-10, rtol=0)
    fwd, bwd = norm_bytes(shape, groups, 8, True, n)
    return {"forward": log.sent("forward"), "backward": log.sent("backward"), "f": fwd, "b": bwd}


# ----------------------------------------------------------------------------- a small UNet
class Motion(torch.nn.Module):
    """A motion module written like diffusers': folds frames into the batch outside, reshapes
    with the full frame count, normalizes over frames and rows, convolves over frames."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = torch.nn.GroupNorm(2, c)
        self.conv = torch.nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x, num_frames: int):
        bf, c, h, w = x.shape
        y = x.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)
        y = self.conv(torch.nn.functional.silu(self.norm(y)))
        return x + y.permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)


class Net(torch.nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, c, 3, padding=1)
        self.motion = Motion(c)
        self.conv_out = torch.nn.Conv2d(c, 3, 1)

    def forward(self, x):  # (B, F, 3, H, W)
        b, f = x.shape[:2]
        h = self.conv_in(x.flatten(0, 1))
        h = self.motion(h, num_frames=f)
        return self.conv_out(h).reshape(b, f, 3, *x.shape[3:])


STREAMS = [
    dsp.parallelize.Stream(
        "x",
        "B F C H W",
        entry="conv_in",
        exit="conv_out",
        shard="F",
        seq=("F",),
        layout="(B F) C H W",
        exit_arg=0,
    )
]
DECLARE = {
    "": {"inputs": {"x": "B F Ci Hi Wi"}},
    "motion": {
        "compute": "F",
        "inputs": {"x": "(B F) Cm Hm Wm"},
        "shard": "Hm Wm",
        "norm": "B Cm F Hm Wm",
    },
}


def small_unet(shape=(2, 5, 3, 7, 3)):
    """The motion module runs on row shards (one switch in, one back, norm statistics summed):
    output and every gradient equal one process; bytes equal the dry run."""
    import copy

    import dsp.parallelize as P

    torch.manual_seed(0)
    model = Net().double()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    (ref(x) * up).sum().backward()
    n = dist.get_world_size()
    rec = P.record(model, (x,), streams=STREAMS, declare=DECLARE)
    plan = rec.plan(n)
    handle = P.parallelize(model, plan, declare=DECLARE)
    xs = x.clone().requires_grad_()
    with dsp.comm_log() as log:
        out = model(xs)
        (out * up).sum().backward()
    handle.sync_grads()
    torch.testing.assert_close(out, ref(x), atol=1e-12, rtol=0)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0, msg=name)
    return {
        "sent": log.sent("forward") + log.sent("backward"),
        "predicted": rec.cost(plan, n).total,
        "stages": [(st.kind, st.module, st.shard) for st in plan.stages],
    }
