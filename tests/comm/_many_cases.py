"""Per-rank bodies for switch_many (module-level so worker processes can import them)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import dsp
from dsp.comm.primitives import switch_many
from tests.comm._cases import encoded


def switch_many_equals_switches(shapes, src, dst, dtype=torch.float64, pass_size=True):
    """Equal to one switch per tensor, exactly; the same bytes; one all-to-all."""
    fulls = [encoded(s, dtype) + 1000.0 * t for t, s in enumerate(shapes)]
    xs = [dsp.local_shard(f, src) for f in fulls]
    sizes = [s[src] for s in shapes] if pass_size else None
    with dsp.comm_log() as each:
        want = [dsp.switch(x, src, dst, src_size=s[src]) for x, s in zip(xs, shapes)]
    with dsp.comm_log() as one:
        got = switch_many(xs, src, dst, src_size=sizes)
    for g, w, f in zip(got, want, fulls):
        assert torch.equal(g, w)
        assert torch.equal(g, dsp.local_shard(f, dst))
    n = dist.get_world_size()
    assert one.bytes_sent == each.bytes_sent and one.bytes_recv == each.bytes_recv
    assert one.count("all_to_all") == (1 if n > 1 else 0)
    assert each.count("all_to_all") == (len(shapes) if n > 1 else 0)
    return True


def switch_many_grad(shapes, src, dst):
    """Forward and backward equal per-tensor switches exactly; backward is one all-to-all."""
    torch.manual_seed(0)
    fulls = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ws = [torch.randn(s, dtype=torch.float64) for s in shapes]

    def run(many: bool):
        xs = [dsp.local_shard(f, src).clone().requires_grad_() for f in fulls]
        with dsp.comm_log() as log:
            if many:
                ys = switch_many(xs, src, dst, src_size=[s[src] for s in shapes])
            else:
                ys = [dsp.switch(x, src, dst, src_size=s[src]) for x, s in zip(xs, shapes)]
            # the last output unused: its gradient is zero
            loss = sum((y * dsp.local_shard(w, dst)).sum() for y, w in zip(ys[:-1], ws))
            loss.backward()
        return ys, [x.grad if x.grad is not None else torch.zeros_like(x) for x in xs], log

    ys_m, gs_m, log_m = run(True)
    ys_s, gs_s, log_s = run(False)
    for a, b in zip(ys_m, ys_s):
        assert torch.equal(a, b)
    for a, b in zip(gs_m, gs_s):
        assert torch.equal(a, b)
    n = dist.get_world_size()
    if n > 1:
        assert log_m.count("all_to_all", "backward") == 1
        with dsp.comm_log() as back:  # every gradient switched back on its own
            for y, s in zip(ys_m, shapes):
                dsp.switch(y.detach(), dst, src, src_size=s[dst])
        assert log_m.sent("backward") == back.bytes_sent
    return True
