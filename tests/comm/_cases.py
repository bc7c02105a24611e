"""Per-rank test bodies (module-level so worker processes can import them)."""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist

import dsp


def encoded(shape, dtype=torch.float64) -> torch.Tensor:
    """Each element holds its global linear index: its value names its coordinates."""
    return torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape).to(dtype)


def kept_elements(shape, src, dst, n, r) -> int:
    """Elements of rank r's src-shard that stay on rank r after switch(src -> dst)."""
    s_r = dsp.shard_sizes(shape[src], n)[r]
    d_r = dsp.shard_sizes(shape[dst], n)[r]
    rest = math.prod(v for i, v in enumerate(shape) if i not in (src, dst))
    return s_r * d_r * rest


def switch_placement(shapes, pairs=None, dtype=torch.float64, pass_size=True, group=None):
    """Every element lands in place; bytes equal the closed form; the round trip is exact."""
    n = dist.get_world_size(group)
    r = dist.get_rank(group)
    checked = 0
    for shape in shapes:
        full = encoded(shape, dtype)
        dims = pairs if pairs is not None else itertools.permutations(range(len(shape)), 2)
        for src, dst in dims:
            x = dsp.local_shard(full, src, group)
            with dsp.comm_log() as log:
                y = dsp.switch(x, src, dst, group, src_size=shape[src] if pass_size else None)
            assert torch.equal(y, dsp.local_shard(full, dst, group)), (shape, src, dst)
            es = full.element_size()
            want = (x.numel() - kept_elements(shape, src, dst, n, r)) * es if n > 1 else 0
            assert log.bytes_sent == want, (shape, src, dst, log.bytes_sent, want)
            assert log.count("all_to_all") == (1 if n > 1 else 0)
            if not pass_size and n > 1:
                assert log.meta_bytes_sent > 0 and len(log.records) == 2
            back = dsp.switch(y, dst, src, group, src_size=shape[dst])
            assert torch.equal(back, x)
            assert torch.equal(dsp.gather(back, src, group, size=shape[src]), full)
            checked += 1
    return checked


def switch_negative_and_noncontig():
    full = encoded((3, 5, 7, 4))
    x = dsp.local_shard(full, -3)
    y = dsp.switch(x, -3, -1, src_size=5)
    assert torch.equal(y, dsp.local_shard(full, 3))
    # a non-contiguous input: a transposed view of a sharded tensor
    ft = full.transpose(0, 2)  # (7, 5, 3, 4), non-contiguous
    xt = dsp.local_shard(ft, 1)
    assert not xt.is_contiguous()
    yt = dsp.switch(xt, 1, 0, src_size=5)
    assert torch.equal(yt, dsp.local_shard(ft, 0))
    return True


def switch_dtypes():
    for dtype in [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
    ]:
        full = encoded((5, 3, 7))
        if dtype == torch.bool:
            full = (full.long() % 3) == 0
        elif dtype.is_complex:
            full = torch.complex(full, -full).to(dtype)
        else:
            full = (full % 100).to(dtype)
        x = dsp.local_shard(full, 0)
        y = dsp.switch(x, 0, 2, src_size=5)
        assert y.dtype == dtype
        assert torch.equal(y, dsp.local_shard(full, 2)), dtype
        assert torch.equal(dsp.gather(y, 2, size=7), full), dtype
    return True


def subgroup_switch():
    """Two disjoint sub-groups switch independently; every rank creates every group."""
    n = dist.get_world_size()
    halves = [list(range(0, n // 2)), list(range(n // 2, n))]
    groups = [dsp.new_group(h) for h in halves]
    mine = groups[0] if dist.get_rank() in halves[0] else groups[1]
    shape = (2, 7, 5, 3)
    return switch_placement([shape], pairs=[(1, 2), (2, 1), (0, 3)], group=mine)


def split_gather_placement(shapes):
    n, r = dist.get_world_size(), dist.get_rank()
    for shape in shapes:
        full = encoded(shape)
        for d in range(len(shape)):
            with dsp.comm_log() as log:
                x = dsp.split(full, d)
            assert log.bytes_sent == 0 and not log.records
            assert torch.equal(x, torch.tensor_split(full, n, dim=d)[r])
            with dsp.comm_log() as log:
                g = dsp.gather(x, d, size=shape[d])
            assert torch.equal(g, full)
            es = full.element_size()
            assert log.bytes_sent == (x.numel() * (n - 1) * es if n > 1 else 0)
            assert log.sent(op="all_gather") == log.bytes_sent
            # size learned: one metadata exchange, same payload bytes
            with dsp.comm_log() as log2:
                g2 = dsp.gather(x, d)
            assert torch.equal(g2, full)
            assert log2.bytes_sent == log.bytes_sent
    return True


# ----------------------------------------------------------------------------- gradients
def _f(y, w):
    return (torch.sin(y) * w).sum()


def switch_grad(shape, src, dst):
    torch.manual_seed(0)
    xf = torch.randn(shape, dtype=torch.float64)
    wf = torch.randn(shape, dtype=torch.float64)
    xr = xf.clone().requires_grad_()
    _f(xr, wf).backward()  # single-process reference
    x = dsp.local_shard(xf, src).clone().requires_grad_()
    with dsp.comm_log() as log:
        y = dsp.switch(x, src, dst, src_size=shape[src])
        _f(y, dsp.local_shard(wf, dst)).backward()
    assert torch.allclose(x.grad, dsp.local_shard(xr.grad, src), rtol=0, atol=1e-12)
    n = dist.get_world_size()
    if n > 1:
        # backward is switch(dst -> src): one all-to-all with that switch's closed form
        r, es = dist.get_rank(), xf.element_size()
        g_numel = y.numel()
        assert log.count("all_to_all", "backward") == 1
        assert log.sent("backward") == (g_numel - kept_elements(shape, dst, src, n, r)) * es
    return True


def split_gather_grad(shape, dim):
    """split: replicated input gets the gradient of the sum of the ranks' local losses.
    gather: with the same loss on every rank, the shard gets its slice of that loss's grad."""
    torch.manual_seed(1)
    xf = torch.randn(shape, dtype=torch.float64)
    wf = torch.randn(shape, dtype=torch.float64)
    xr = xf.clone().requires_grad_()
    _f(xr, wf).backward()
    ref = xr.grad
    # split
    x = xf.clone().requires_grad_()
    y = dsp.split(x, dim)
    _f(y, dsp.local_shard(wf, dim)).backward()
    assert torch.allclose(x.grad, ref, rtol=0, atol=1e-12)
    # gather
    xs = dsp.local_shard(xf, dim).clone().requires_grad_()
    g = dsp.gather(xs, dim, size=shape[dim])
    _f(g, wf).backward()
    assert torch.allclose(xs.grad, dsp.local_shard(ref, dim), rtol=0, atol=1e-12)
    return True


def _toy_model(x, a, b, group=None, scaled=False):
    """Replicated param ``a`` before split, ``b`` applied on shards, gather, same loss."""
    h = torch.tanh(x * a)  # replicated compute
    hs = dsp.split(h, 0, group, grad_scale="down" if scaled else 1.0)
    hs = torch.sin(hs * b)  # sharded compute, replicated parameter
    ys = dsp.switch(hs, 0, 1, group, src_size=h.shape[0])
    y = dsp.gather(ys, 1, group, size=h.shape[1], grad_scale="up" if scaled else 1.0)
    return (y**2).sum()


def grad_convention():
    """The documented recipes give the single-process gradients of parameters."""
    torch.manual_seed(2)
    x = torch.randn(5, 7, dtype=torch.float64)
    a0 = torch.randn(7, dtype=torch.float64)
    b0 = torch.randn(7, dtype=torch.float64)
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    (torch.sin(torch.tanh(x * a) * b) ** 2).sum().backward()  # single-process reference
    n = dist.get_world_size()
    # 1) default (exact adjoints): sum grads of params used on shards; others are complete.
    a1, b1 = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    _toy_model(x, a1, b1).backward()
    assert torch.allclose(a1.grad, a.grad, atol=1e-12)
    gb = b1.grad.clone()
    dist.all_reduce(gb)
    assert torch.allclose(gb, b.grad, atol=1e-12)
    # 2) paper convention (split 'down', gather 'up'): average *every* grad over the group.
    a2, b2 = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    _toy_model(x, a2, b2, scaled=True).backward()
    for p, ref in ((a2, a.grad), (b2, b.grad)):
        g = p.grad.clone()
        dist.all_reduce(g)
        assert torch.allclose(g / n, ref, atol=1e-12)
    return True


# ----------------------------------------------------------------------------- errors
def expect_error(fn, exc, *fragments):
    """Run fn; it must raise ``exc`` whose message holds every fragment. Returns the message."""
    try:
        fn()
    except exc as e:
        msg = str(e)
        for f in fragments:
            assert f in msg, (f, msg)
        return msg
    raise AssertionError(f"{fn} did not raise {exc.__name__}")


def bad_dims():
    x = torch.zeros(2, 3, 4)
    expect_error(lambda: dsp.switch(x, 3, 0, src_size=3), IndexError, "src_dim=3", "3 dims")
    expect_error(lambda: dsp.switch(x, 0, -4), IndexError, "dst_dim=-4")
    expect_error(lambda: dsp.switch(x, 1, -2), ValueError, "same dim")
    expect_error(lambda: dsp.gather(x, 5), IndexError, "dim=5")
    expect_error(lambda: dsp.split(x, -7), IndexError, "dim=-7")
    expect_error(lambda: dsp.switch(x, 0, 1, grad_scale=2), TypeError)
    expect_error(lambda: dsp.gather(x, 0, grad_scale="sideways"), ValueError, "grad_scale")
    return True


def shape_mismatch_validated():
    """Ranks disagree on a non-sharded dim: every rank raises the same clear error."""
    r = dist.get_rank()
    x = torch.zeros(2, 3, 4 + (r == 1))
    msg = expect_error(
        lambda: dsp.switch(x, 1, 2, validate=True),
        ValueError,
        "disagree",
        "dim 2 differs",
        "rank 1: (2, 3, 5)",
    )
    y = torch.zeros(2, 3, dtype=torch.float32 if r else torch.float64)
    expect_error(lambda: dsp.gather(y, 0, validate=True), ValueError, "dtype differs")
    z = torch.zeros(2 + r, 3)
    expect_error(lambda: dsp.split(z, 1, validate=True), ValueError, "dim 0 differs")
    # valid tensors pass validation; src_size must match the actual shard lengths
    ok = dsp.local_shard(torch.zeros(5, 7), 0)
    dsp.switch(ok, 0, 1, validate=True, src_size=5)
    expect_error(lambda: dsp.switch(ok, 0, 1, validate=True, src_size=6), ValueError, "src_size=6")
    return msg


def wrong_local_size_without_validation():
    """One rank's shard is wrong and nothing validates: that rank raises at once, the others
    wait in the all-to-all and end with the group's timeout error instead of hanging."""
    r = dist.get_rank()
    x = torch.zeros(5 if r == 0 else 3, 4)
    dsp.switch(x, 0, 1, src_size=6)


def non_member_group():
    g = dsp.new_group([0, 1])
    if dist.get_rank() == 2:
        expect_error(lambda: dsp.switch(torch.zeros(2, 2), 0, 1, g), RuntimeError, "not a member")
    return True


def split_shard_mode_grad():
    """grad_mode='shard': no backward communication; summed over ranks it equals the exact
    adjoint (the gradient of the sum of the ranks' losses)."""
    torch.manual_seed(3)
    n = dist.get_world_size()
    xf = torch.randn(5, 7, dtype=torch.float64)
    wf = torch.randn(5, 7, dtype=torch.float64)
    xr = xf.clone().requires_grad_()
    _f(xr, wf).backward()
    x = xf.clone().requires_grad_()
    with dsp.comm_log() as log:
        y = dsp.split(x, 1, grad_mode="shard")
        _f(y, dsp.local_shard(wf, 1)).backward()
    assert log.bytes_sent == 0
    g = x.grad.clone()
    dist.all_reduce(g)
    assert torch.allclose(g, xr.grad, atol=1e-12)
    assert n == 1 or not torch.allclose(x.grad, xr.grad)  # each rank holds only its part
    return True
