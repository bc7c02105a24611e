"""Ring attention (non-causal, no mask) in pure PyTorch, as an injectable attention core.

Every rank holds one contiguous block of the sequence (dim 1 of ``(B, L_r, H, D)``); blocks
may be uneven or empty. The key/value blocks travel around the ring: at step ``i`` rank ``r``
attends its queries to the block of rank ``(r - i) mod N`` while that block is already on its
way to rank ``r + 1`` (the transfer overlaps the block's compute). Partial results are merged
in fp32 (fp64 for fp64 inputs) with the log-sum-exp formula
``out -= sigmoid(lse_b - lse) * (out - out_b)``, ``lse -= logsigmoid(lse - lse_b)``.

The backward is hand-written (nothing is differentiated through communication): each block's
probabilities are recomputed from the saved ``q, k, v, out, lse``; ``dq`` accumulates locally,
and the ``dk, dv`` accumulator of each block travels around the ring with it, every rank
adding its contribution, until it arrives back at the block's owner.

Bytes sent by rank ``r`` (``N`` ranks, block lengths ``L_j``, ``L = sum_j L_j``, ``e`` the
element size of q/k/v, ``e_g = max(e, 4)`` the element size of the gradient accumulators,
which are fp32 for half types; ``B`` batch, ``H`` heads, ``D`` head dim):

* forward: at steps ``i = 0..N-2`` one ``send_recv`` record (a
  :func:`~dsp.comm.collectives.ring_shift`) of the kv block of rank ``(r - i) mod N``
  (k and v in one buffer), i.e. ``2 B H D e * sum_{i=0}^{N-2} L_{(r-i) mod N}``
  ``= 2 B H D e (L - L_{(r+1) mod N})``; ``N - 1`` records.
* backward: the same ``N - 1`` kv transfers, plus at steps ``i = 0..N-1`` the dk/dv
  accumulator of block ``(r - i) mod N`` (one buffer): every block once, so
  ``2 B H D e (L - L_{(r+1) mod N}) + 2 B H D e_g L``; ``2N - 1`` records.
* received: forward ``2 B H D e (L - L_r)``; backward that plus ``2 B H D e_g L``.
* ``N = 1``: local attention, nothing sent.

:func:`ring_bytes` implements these formulas; the tests check them against ``dsp.comm_log()``.
On CPU each block runs torch's fused flash kernel (forward returning the log-sum-exp, and its
backward), the kernel torch's own ``_templated_ring_attention`` runs; elsewhere the same math
in einsum. ``benchmarks/ring_vs_torch.py`` compares the two rings on the same inputs and bytes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from dsp.comm.collectives import ring_shift
from dsp.mesh import GroupInfo, group_info

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["RingCore", "ring_attention", "ring_bytes"]

_TAG_KV, _TAG_DKV = "ring_attention.kv", "ring_attention.dkv"


def ring_bytes(
    seq_sizes: Sequence[int],
    rank: int,
    batch: int,
    heads: int,
    head_dim: int,
    elem_size: int,
    *,
    grad_elem_size: Optional[int] = None,
) -> dict:
    """Bytes rank ``rank`` sends in :func:`ring_attention`, forward and backward.

    Args:
        seq_sizes: every rank's block length, in group-rank order.
        rank: the sending rank.
        batch, heads, head_dim: ``B, H, D``.
        elem_size: element size of q/k/v in bytes.
        grad_elem_size: element size of the travelling dk/dv accumulators; default
            ``max(elem_size, 4)`` (what :func:`ring_attention` uses).

    Returns:
        ``{"forward": 2BHDe (L - L_{r+1}), "backward": 2BHDe (L - L_{r+1}) + 2BHD e_g L}``
        (zeros for one rank).
    """
    n = len(seq_sizes)
    if n == 1:
        return {"forward": 0, "backward": 0}
    e_g = grad_elem_size if grad_elem_size is not None else max(elem_size, 4)
    row = 2 * batch * heads * head_dim
    total = sum(seq_sizes)
    kv = row * elem_size * (total - seq_sizes[(rank + 1) % n])
    return {"forward": kv, "backward": kv + row * e_g * total}


# ----------------------------------------------------------------------------- block math
def _fused(x: Tensor) -> bool:
    """Whether torch's fused CPU kernel (flash attention returning the log-sum-exp) runs it."""
    return x.device.type == "cpu" and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"
    )


def _block_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Attention of ``q (B, Lq, H, D)`` to one block ``k, v (B, Lk, H, D)``; Lk > 0.

    Returns ``out (B, Lq, H, D)`` and ``lse (B, H, Lq)``, in the inputs' dtype. On CPU it is
    torch's fused flash kernel (the one ``scaled_dot_product_attention`` uses), elsewhere the
    same math in einsum.
    """
    if _fused(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
        )  # (B, H, Lq, D), (B, H, Lq)
        return out.transpose(1, 2), lse.to(q.dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Lq, Lk)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Lq)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def _merge(
    out: Optional[Tensor], lse: Optional[Tensor], out_b: Tensor, lse_b: Tensor
) -> Tuple[Tensor, Tensor]:
    """Merge one block's ``(out_b, lse_b)`` into the running ``(out, lse)`` (LSE formula)."""
    if out is None or lse is None:
        return out_b, lse_b
    w = torch.sigmoid(lse_b - lse).transpose(1, 2).unsqueeze(-1)  # (B, H, Lq) -> (B, Lq, H, 1)
    return out - w * (out - out_b), lse - F.logsigmoid(lse - lse_b)


def _block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block from recomputed probabilities; returns ``dq, dk, dv``.

    ``out`` and ``lse`` are the attention over the full sequence (``out (B, Lq, H, D)``,
    ``lse (B, H, Lq)``): the block's probabilities are ``exp(s - lse)`` and the softmax
    correction uses ``rowsum(dout * out)``, so the fused kernel's backward applies per block.
    """
    if _fused(q):
        t = [x.transpose(1, 2) for x in (dout, q, k, v, out)]  # (B, H, L, D)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *t, lse.float() if q.dtype != torch.float64 else lse, 0.0, False, scale=scale
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    delta = (dout * out).sum(-1).transpose(1, 2)  # (B, Lq, H) -> (B, H, Lq)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Lq, Lk)
    p = torch.exp(s - lse.unsqueeze(-1))
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dout)  # (B, Lk, H, D)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, v)
    ds = p * (dp - delta.unsqueeze(-1)) * scale
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k)  # (B, Lq, H, D)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q)  # (B, Lk, H, D)
    return dq, dk, dv


# ----------------------------------------------------------------------------- the ring
def _ring_blocks(kv: Tensor, sizes: Sequence[int], info: GroupInfo) -> Iterator[Tuple[int, Tensor]]:
    """Yield ``(owner, kv block (2, B, L_owner, H, D))`` for steps ``i = 0..N-1``.

    While a block is yielded, its transfer to rank ``r + 1`` (and the receipt of the next
    block from ``r - 1``) is in flight.
    """
    n, r = info.size, info.rank
    for i in range(n):
        owner = (r - i) % n
        works, nxt = [], kv
        if i + 1 < n:
            b, _, h, d = kv.shape[1:]
            nxt = kv.new_empty((2, b, sizes[(owner - 1) % n], h, d))
            works = ring_shift(kv, nxt, info.group, tag=_TAG_KV)  # to r + 1, from r - 1
        yield owner, kv
        for w in works:
            w.wait()
        kv = nxt


class _RingAttention(torch.autograd.Function):
    """Ring attention: kv blocks around the ring in forward; kv and dk/dv in backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, info: GroupInfo, sizes: List[int]):
        acc = torch.promote_types(q.dtype, torch.float32)
        scale = 1.0 / math.sqrt(q.shape[-1])
        qa = q.to(acc)
        out = lse = None
        for _, kv in _ring_blocks(torch.stack([k, v]), sizes, info):
            if q.shape[1] and kv.shape[2]:  # empty blocks contribute nothing
                kva = kv.to(acc)
                out, lse = _merge(out, lse, *_block_forward(qa, kva[0], kva[1], scale))
        if out is None or lse is None:  # no keys at all, or no queries here
            b, lq, h, _ = q.shape
            out = torch.zeros(q.shape, dtype=acc, device=q.device)
            lse = torch.full((b, h, lq), float("-inf"), dtype=acc, device=q.device)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.info, ctx.sizes, ctx.scale = info, sizes, scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        info, sizes, scale = ctx.info, ctx.sizes, ctx.scale
        n = info.size
        acc = lse.dtype
        qa, da, oa = q.to(acc), dout.to(acc), out.to(acc)
        dq = torch.zeros_like(qa)
        dkv_in: Optional[Tensor] = None  # dk/dv of the block at hand, summed by ranks before
        works: list = []
        for i, (owner, kv) in enumerate(_ring_blocks(torch.stack([k, v]), sizes, info)):
            if q.shape[1] and kv.shape[2]:
                kva = kv.to(acc)
                dq_b, dk_b, dv_b = _block_backward(da, qa, kva[0], kva[1], oa, lse, scale)
                dq += dq_b
                dkv = torch.stack([dk_b, dv_b])  # (2, B, L_owner, H, D), a new buffer
            else:  # an empty block (or no queries here): nothing to add
                dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
            if n == 1:
                dkv_in = dkv
                break
            if i > 0:  # the accumulator of this block, sent by rank r - 1 at step i - 1
                for w in works:
                    w.wait()
                dkv += dkv_in
            b, _, h, d = dkv.shape[1:]
            dkv_in = dkv.new_empty((2, b, sizes[(owner - 1) % n], h, d))
            works = ring_shift(dkv, dkv_in, info.group, tag=_TAG_DKV)
        for w in works:  # the last one brings this rank's own block, complete
            w.wait()
        assert dkv_in is not None
        dt = q.dtype
        return dq.to(dt), dkv_in[0].to(dt), dkv_in[1].to(dt), None, None


def _check(q: Tensor, k: Tensor, v: Tensor, info: GroupInfo, sizes: List[int]) -> None:
    """Raise a clear error naming the tensor, sizes and rank if the inputs don't fit."""
    where = f"rank {info.rank} of {info.size}"
    if q.dim() != 4:
        raise ValueError(f"ring_attention: q must be (B, L, H, D), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"ring_attention ({where}): {name} {tuple(t.shape)} {t.dtype} {t.device} must "
                f"match q {tuple(q.shape)} {q.dtype} {q.device} (self-attention blocks)"
            )
    if len(sizes) != info.size or any(s < 0 for s in sizes):
        raise ValueError(
            f"ring_attention ({where}): seq_sizes={list(sizes)} must hold one length >= 0 "
            f"per rank of the group ({info.size})"
        )
    if sizes[info.rank] != q.shape[1]:
        raise ValueError(
            f"ring_attention ({where}): q has {q.shape[1]} rows in dim 1 but "
            f"seq_sizes[{info.rank}] = {sizes[info.rank]} (seq_sizes={list(sizes)})"
        )


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[ProcessGroup] = None,
    *,
    seq_sizes: Optional[Sequence[int]] = None,
) -> Tensor:
    """This rank's rows of ``softmax(q k^T / sqrt(D)) v`` over the whole sequence.

    Args:
        q, k, v: ``(B, L_r, H, D)``, this rank's contiguous block of the sequence (dim 1).
        group: the sequence-parallel group (``None``: the world).
        seq_sizes: every rank's ``L_r`` in group-rank order (uneven and empty allowed);
            ``None`` means every rank holds ``q.shape[1]``.

    Returns:
        ``(B, L_r, H, D)`` in the dtype of ``q``; differentiable in q, k and v.

    Raises:
        ValueError: shapes, dtypes or ``seq_sizes`` that do not fit (names the rank).
    """
    info = group_info(group)
    sizes = [q.shape[1]] * info.size if seq_sizes is None else [int(s) for s in seq_sizes]
    _check(q, k, v, info, sizes)
    return _RingAttention.apply(q, k, v, info, sizes)


class RingCore:
    """Attention core for ``module.core = RingCore(group, seq_sizes)``: calls ring attention.

    ``seq_sizes``: every rank's block length, or a callable returning them at call time (a
    strategy whose sizes are known only once the model's input arrives).
    """

    def __init__(
        self,
        group: Optional[ProcessGroup] = None,
        seq_sizes: Union[Sequence[int], Callable[[], Sequence[int]], None] = None,
    ):
        self.group = group
        self.seq_sizes = seq_sizes

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``(B, L_r, H, D)`` blocks in, this rank's rows out; ``mask`` must be ``None``."""
        if mask is not None:
            raise ValueError("RingCore: masks are not supported (self-attention without mask)")
        sizes = self.seq_sizes() if callable(self.seq_sizes) else self.seq_sizes
        return ring_attention(q, k, v, self.group, seq_sizes=sizes)

    def __repr__(self) -> str:
        return f"RingCore(seq_sizes={self.seq_sizes})"
