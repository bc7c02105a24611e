"""Write sampled videos: GIF (Pillow when installed, else a small built-in encoder) or MP4.

The built-in GIF encoder needs nothing but the standard library: a fixed 6x6x6 colour cube
palette and "uncompressed" LZW (every pixel is one 9-bit code, with a clear code often enough
that the decoder's code width never grows), which every GIF decoder reads.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

__all__ = ["to_frames", "tile", "write_video", "write_gif_builtin"]


def to_frames(video: Tensor, *, scale: int = 1) -> Tensor:
    """``(3, T, H, W)`` in [-1, 1] -> ``(T, H*scale, W*scale, 3)`` uint8 (nearest upscaling)."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a (3, T, H, W) video, got {tuple(video.shape)}")
    x = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.permute(1, 2, 3, 0)  # (T, H, W, 3)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return x.contiguous()


def tile(videos: Tensor, *, scale: int = 1, gap: int = 2) -> Tensor:
    """A batch ``(B, 3, T, H, W)`` side by side: ``(T, H*scale, B*(W*scale+gap)-gap, 3)``."""
    frames = [to_frames(v, scale=scale) for v in videos]
    if gap and len(frames) > 1:
        t, h = frames[0].shape[:2]
        sep = torch.zeros(t, h, gap, 3, dtype=torch.uint8)
        out = [frames[0]]
        for f in frames[1:]:
            out += [sep, f]
        frames = out
    return torch.cat(frames, dim=2)


def _palette() -> bytes:
    cube = [(r * 51, g * 51, b * 51) for r in range(6) for g in range(6) for b in range(6)]
    cube += [(0, 0, 0)] * (256 - len(cube))
    return bytes(c for rgb in cube for c in rgb)


def _lzw_uncompressed(indices: bytes) -> bytes:
    """LZW data (min code size 8) that emits one 9-bit code per pixel."""
    clear, eoi = 256, 257
    acc = nbits = 0
    out = bytearray()

    def put(code: int) -> None:
        nonlocal acc, nbits
        acc |= code << nbits
        nbits += 9
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8

    for i, idx in enumerate(indices):
        if i % 250 == 0:  # the decoder's table stays below 512 entries: 9-bit codes throughout
            put(clear)
        put(idx)
    put(eoi)
    if nbits:
        out.append(acc & 0xFF)
    return bytes(out)


def _blocks(data: bytes) -> bytes:
    parts = [bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255)]
    return b"".join(parts) + b"\x00"


def write_gif_builtin(path: Union[str, Path], frames: Tensor, *, fps: float = 8.0) -> None:
    """Write ``(T, H, W, 3)`` uint8 frames as a looping GIF without any imaging library."""
    t, h, w, _ = frames.shape
    q = (frames.to(torch.int32) + 25) // 51  # 0..5 per channel
    idx = (q[..., 0] * 36 + q[..., 1] * 6 + q[..., 2]).to(torch.uint8)  # (T, H, W)
    delay = max(1, round(100 / fps))
    out = bytearray(b"GIF89a")
    out += struct.pack("<HHBBB", w, h, 0xF7, 0, 0)  # global colour table of 256 entries
    out += _palette()
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop forever
    for f in range(t):
        out += b"\x21\xf9\x04\x00" + struct.pack("<H", delay) + b"\x00\x00"
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0)
        out += b"\x08" + _blocks(_lzw_uncompressed(idx[f].numpy().tobytes()))
    out += b"\x3b"
    Path(path).write_bytes(bytes(out))


def write_video(path: Union[str, Path], frames: Tensor, *, fps: float = 8.0) -> str:
    """Write ``(T, H, W, 3)`` uint8 frames to ``path`` (``.gif`` or ``.mp4``); returns the writer.

    GIF: Pillow if installed (adaptive palette), else :func:`write_gif_builtin`. MP4 needs
    ``imageio`` with its ffmpeg plugin.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        try:
            from PIL import Image
        except ImportError:
            write_gif_builtin(path, frames, fps=fps)
            return "builtin"
        images = [Image.fromarray(f.numpy()) for f in frames]
        images[0].save(
            path,
            save_all=True,
            append_images=images[1:],
            duration=max(10, round(1000 / fps)),
            loop=0,
            optimize=False,
        )
        return "pillow"
    if suffix == ".mp4":
        try:
            import imageio.v3 as iio
        except ImportError:
            raise RuntimeError(
                f"{path}: writing MP4 needs imageio with ffmpeg (pip install 'imageio[ffmpeg]'); "
                "or write a .gif"
            ) from None
        iio.imwrite(path, frames.numpy(), fps=fps)
        return "imageio"
    raise ValueError(f"{path}: unknown video format {suffix!r}; use .gif or .mp4")
