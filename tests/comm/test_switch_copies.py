"""The switch packs and unpacks with at most one copy each, and none where the blocks are
already contiguous (counted: bytes written by every aten op that is not a view)."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsp.comm.primitives import _pack, _unpack
from dsp.comm.shards import shard_sizes


class _Written(TorchDispatchMode):
    """Bytes written by ops that produce data (views and empty allocations write none)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not (func.is_view or name.startswith("empty") or name.startswith("_unsafe_view")):
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


def _bytes(t):
    return t.numel() * t.element_size()


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize(
    "shape,src,dst",
    [((2, 6, 5, 4), 1, 2), ((2, 6, 5, 4), 2, 1), ((1, 6, 5, 4), 1, 2), ((3, 7, 5), 0, 2)],
)
def test_pack_one_copy_unpack_one_copy(n, shape, src, dst):
    x = torch.randn(shape).transpose(0, 1).transpose(0, 1)  # contiguous
    sizes = shard_sizes(shape[dst], n)
    with _Written() as w:
        send, splits = _pack([x], dst, [sizes], n)
    assert w.bytes <= _bytes(x) and sum(splits) == x.numel()
    if math.prod(shape[:dst]) == 1:
        assert w.bytes == 0 and send.data_ptr() == x.data_ptr()
    # unpack: pretend every rank sent a block of this rank's dst part, src shards of each rank
    src_sizes = shard_sizes(shape[src], n)
    out_shape = list(shape)
    out_shape[dst] = sizes[0]
    recv = torch.randn(math.prod(out_shape))
    with _Written() as w:
        (y,) = _unpack(recv, [out_shape], src, [src_sizes], n)
    assert list(y.shape) == out_shape and y.is_contiguous()
    assert w.bytes <= _bytes(recv)
    if math.prod(shape[:src]) == 1:
        assert w.bytes == 0 and y.data_ptr() == recv.data_ptr()


def test_noncontiguous_input_is_packed_with_one_copy():
    x = torch.randn(2, 5, 6, 4).transpose(1, 2)  # (2, 6, 5, 4) viewed, like sdpa's q
    with _Written() as w:
        _pack([x], 2, [shard_sizes(5, 3)], 3)
    assert w.bytes == _bytes(x)


def test_many_tensors_one_copy_each_side():
    xs = [torch.randn(2, 6, 5, 4) for _ in range(3)]
    with _Written() as w:
        send, _ = _pack(xs, 2, [shard_sizes(5, 2)] * 3, 2)
    assert w.bytes == sum(_bytes(x) for x in xs) == _bytes(send)
    shapes = [[2, 6, 3, 4]] * 3
    recv = torch.randn(3 * 2 * 6 * 3 * 4)
    with _Written() as w:
        ys = _unpack(recv, shapes, 1, [shard_sizes(6, 2)] * 3, 2)
    assert w.bytes == _bytes(recv) and all(list(y.shape) == s for y, s in zip(ys, shapes))


@pytest.mark.parametrize("h", [5, 6])  # uneven blocks (one copy per block), alike (one per tensor)
def test_many_tensors_even_and_uneven_write_each_byte_once(h):
    xs = [torch.randn(2, 6, h, 4) for _ in range(3)]
    with _Written() as w:
        send, splits = _pack(xs, 2, [shard_sizes(h, 3)] * 3, 3)
    assert w.bytes == sum(_bytes(x) for x in xs) == _bytes(send)
    assert splits == [3 * 2 * 6 * s * 4 for s in shard_sizes(h, 3)]


def _inputs(shape):
    """Value-encoded tensors of ``shape``: contiguous, a transposed view, and a slice at a
    storage offset (the layouts a switch receives from sdpa and from views)."""
    numel = math.prod(shape)
    base = torch.arange(numel, dtype=torch.float64).view(shape)
    flipped = base.clone().movedim(-1, 0).contiguous().movedim(0, -1)  # same values, strided
    padded = torch.zeros(numel + 7, dtype=torch.float64)
    padded[7:] = base.reshape(-1)
    doubled = torch.stack([base, -base], dim=1).flatten(0, 1)  # rows of base at even indices
    row = base.narrow(0, 0, 1) if shape[0] else base
    return {
        "contiguous": base,
        "strided": flipped,
        "offset": padded[7:].view(shape),
        "every other": doubled[::2],  # a step of 2 in the first dim
        "expanded": row.expand(shape),  # stride 0 in the first dim: every row the same
    }


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    "shape,dim",
    [((2, 6, 4, 3), 2), ((2, 6, 4, 3), 1), ((2, 6, 4, 3), 3), ((2, 6, 4, 3), 0), ((3, 0, 6), 2)],
)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "offset", "every other", "expanded"])
def test_pack_and_unpack_place_every_element(n, shape, dim, layout):
    """Even and uneven splits, any strides and offsets: the send buffer holds block j of
    ``dim`` for rank j in order, and unpack joins N received blocks along ``dim``."""
    x = _inputs(shape)[layout]
    sizes = shard_sizes(shape[dim], n)
    send, splits = _pack([x], dim, [sizes], n)
    expect = [b.reshape(-1) for b in torch.split(x, sizes, dim)]
    assert splits == [b.numel() for b in expect]
    torch.testing.assert_close(send, torch.cat(expect), rtol=0, atol=0)
    # unpack: N blocks of this rank's part, each a slice of ``dim``, in rank order
    blocks = torch.split(x, sizes, dim)
    recv_full = torch.zeros(x.numel() + 5, dtype=x.dtype)
    recv_full[5:] = torch.cat([b.reshape(-1) for b in blocks])
    (y,) = _unpack(recv_full[5:], [list(shape)], dim, [sizes], n)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
