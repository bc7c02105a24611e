"""Per-rank bodies of the ring attention tests (module-level so workers can import them)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dsp
from dsp.attention import RingCore, ring_attention, ring_bytes

B, H, D = 2, 3, 4
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _reference(q, k, v, w):
    """Single-process SDPA on the full sequence: output and grads of ``sum(out * w)``."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _recv(log, phase):
    return sum(r.bytes_recv for r in log.records if r.phase == phase and not r.meta)


def matches_single_process(seq_len: int, dtype: torch.dtype, seed: int = 0) -> bool:
    """Output and q/k/v grads equal the single-process ones; bytes equal ring_bytes."""
    n, r = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(seed)
    q, k, v, w = (torch.randn(B, seq_len, H, D, generator=g, dtype=dtype) for _ in range(4))
    ref = _reference(q, k, v, w)
    sizes = dsp.shard_sizes(seq_len, n)
    qs, ks, vs = (dsp.local_shard(t, 1).clone().requires_grad_() for t in (q, k, v))
    with dsp.comm_log() as log:
        out = ring_attention(qs, ks, vs, seq_sizes=sizes)
        (out * dsp.local_shard(w, 1)).sum().backward()
    assert out.dtype == dtype and out.shape == qs.shape
    tol = TOL[dtype]
    for name, got, want in zip("o q k v".split(), (out, qs.grad, ks.grad, vs.grad), ref):
        err = (got - dsp.local_shard(want, 1)).abs().max().item() if got.numel() else 0.0
        assert err <= tol, (name, seq_len, dtype, r, err)
    # bytes: measured == analytic, forward and backward, sent and received
    e = q.element_size()
    want = ring_bytes(sizes, r, B, H, D, e)
    assert log.sent("forward") == want["forward"], (log.sent("forward"), want)
    assert log.sent("backward") == want["backward"], (log.sent("backward"), want)
    row, total = 2 * B * H * D, seq_len
    kv_in = row * e * (total - sizes[r]) if n > 1 else 0
    assert _recv(log, "forward") == kv_in
    assert _recv(log, "backward") == kv_in + (row * e * total if n > 1 else 0)
    assert log.count("send_recv", "forward") == n - 1
    assert log.count("send_recv", "backward") == (2 * n - 1 if n > 1 else 0)
    assert len(log.records) == log.count()  # nothing but send_recv, no metadata
    return True


def default_sizes_and_core() -> bool:
    """seq_sizes=None means even blocks; RingCore forwards to ring_attention; mask refused."""
    n = dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, 2 * n, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    want = dsp.local_shard(_reference(q, k, v, torch.ones_like(q))[0], 1)
    qs, ks, vs = (dsp.local_shard(t, 1) for t in (q, k, v))
    assert torch.allclose(ring_attention(qs, ks, vs), want, rtol=0, atol=1e-12)
    core = RingCore(None, None)
    core.seq_sizes = [2] * n  # a strategy sets it per forward
    assert torch.allclose(core(qs, ks, vs, mask=None), want, rtol=0, atol=1e-12)
    try:
        core(qs, ks, vs, mask=torch.ones(B, 2, dtype=torch.bool))
    except ValueError as err:
        assert "mask" in str(err)
    else:
        raise AssertionError("RingCore accepted a mask")
    return True


def attention_module_with_ring_core(seq_len: int) -> bool:
    """models.layers.Attention with core = RingCore on a shard equals the full module."""
    from dsp.models.layers import Attention

    n = dist.get_world_size()
    torch.manual_seed(3)
    attn = Attention(8, 2, attn_dim="T").double()
    x = torch.randn(2, seq_len, 3, 8, dtype=torch.float64)  # (B, T, S, C)
    want = attn(x)
    attn.core = RingCore(seq_sizes=dsp.shard_sizes(seq_len, n))
    got = attn(dsp.local_shard(x, 1))
    assert torch.allclose(got, dsp.local_shard(want, 1), rtol=0, atol=1e-12)
    return True


def bad_inputs() -> bool:
    """Wrong seq_sizes or mismatched k/v raise on every rank, before any communication."""
    n, r = dist.get_world_size(), dist.get_rank()
    q = torch.zeros(B, 3, H, D)
    for sizes, fragment in (([3] * (n + 1), "per rank"), ([2] * n, f"seq_sizes[{r}] = 2")):
        try:
            ring_attention(q, q, q, seq_sizes=sizes)
        except ValueError as err:
            assert fragment in str(err) and f"rank {r}" in str(err), str(err)
        else:
            raise AssertionError(sizes)
    try:
        ring_attention(q, q[:, :2], q)
    except ValueError as err:
        assert "k (2, 2, 3, 4)" in str(err), str(err)
    else:
        raise AssertionError("mismatched k accepted")
    return True
