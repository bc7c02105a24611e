"""Checkpoint integrity: manifests, verification, partial saves, and usable directories.

A complete checkpoint directory ``step_N`` carries ``manifest.json``: the size and SHA-256
of every other file, written last (see :mod:`dsp.train.checkpoint` for the save protocol).
:func:`intact_checkpoint` verifies the newest and falls back to older ones, naming the bad
file; :func:`remove_partial` deletes what interrupted saves left; :func:`check_ckpt_dir`
checks a directory before training (a directory, writable, room for one checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from torch import nn

__all__ = [
    "MANIFEST",
    "META",
    "LATEST",
    "check_ckpt_dir",
    "checkpoint_bytes",
    "describe_damage",
    "intact_checkpoint",
    "remove_partial",
    "verify_checkpoint",
]

_STEP_DIR = re.compile(r"^step_(\d+)$")
META = "meta.json"
MANIFEST = "manifest.json"
LATEST = "latest"


def _full(path: Path) -> bool:
    """Whether the file system of ``path`` has less than 1 MiB left (even for root)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bfree * st.f_frsize < 2**20


def _step_dirs(root: Path) -> list:
    """``(step, path)`` of every ``step_N`` directory under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(ckpt: Path) -> None:
    files = {}
    for p in sorted(ckpt.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            files[p.name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    text = json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True)
    with open(ckpt / MANIFEST, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(ckpt: Union[str, Path]) -> Optional[str]:
    """``None`` if ``ckpt`` matches its manifest, else what is wrong, naming the file."""
    ckpt = Path(ckpt)
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{ckpt / MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{ckpt / MANIFEST} is unreadable ({e})"
    for name, want in files.items():  # sizes first: cheap, and most damage is truncation
        try:
            size = (ckpt / name).stat().st_size
        except FileNotFoundError:
            return f"{ckpt / name} is missing"
        if size != want["size"]:
            return f"{ckpt / name} has {size} bytes, the manifest says {want['size']} (truncated)"
    for name, want in files.items():
        if _sha256(ckpt / name) != want["sha256"]:
            return f"{ckpt / name} does not match its SHA-256 in the manifest (corrupt)"
    return None


def intact_checkpoint(root: Union[str, Path]) -> tuple:
    """The newest checkpoint under ``root`` that matches its manifest, and the damaged ones
    newer than it: ``(path or None, [(path, what is wrong), ...])``.

    ``root`` may also be one checkpoint directory (then only that one is checked).
    """
    root = Path(root)
    if (root / MANIFEST).is_file() or (root / META).is_file():
        candidates = [root]
    else:
        candidates = [p for _, p in reversed(_step_dirs(root))]
    damaged = []
    for ckpt in candidates:
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt, damaged
        damaged.append((ckpt, problem))
    return None, damaged


def describe_damage(damaged: list, chosen: Optional[Path]) -> str:
    """One line per damaged checkpoint and what is used instead."""
    lines = [f"checkpoint {p.name} is damaged: {why}" for p, why in damaged]
    if damaged:
        lines.append(f"resuming from {chosen}" if chosen else "no intact checkpoint is left")
    return "\n".join(lines)


def remove_partial(root: Union[str, Path]) -> list:
    """Delete what interrupted saves left under ``root`` (``step_*.tmp``, ``step_*.old``,
    ``latest.tmp``); return the removed paths. Call it when no save is running."""
    root = Path(root)
    if not root.is_dir():
        return []
    gone = []
    for p in list(root.glob("step_*.tmp")) + list(root.glob("step_*.old")):
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
    if (root / (LATEST + ".tmp")).is_file():
        (root / (LATEST + ".tmp")).unlink(missing_ok=True)
        gone.append(root / (LATEST + ".tmp"))
    return gone


def checkpoint_bytes(model: nn.Module) -> int:
    """About the size of one checkpoint of ``model`` with AdamW (an upper estimate): the
    parameters and two moments, 4 KiB of DCP framing per tensor (measured ~2.2 KiB), and
    256 KiB for DCP's metadata, ``meta.json`` and the manifest. stdit-tiny: 1.64 MB
    estimated, 1.14 MB written."""
    params = list(model.parameters())
    data = sum(p.numel() * p.element_size() for p in params)
    return 3 * data + 3 * 4096 * len(params) + 256 * 1024


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_ckpt_dir(path: Union[str, Path], need_bytes: int = 0, flag: str = "--ckpt-dir") -> None:
    """Check before training that ``path`` is (or can be made) a writable directory with room
    for one checkpoint of ``need_bytes``.

    Raises:
        ValueError: one line naming the flag, the path and the problem.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory; choose another path")
    existing = path
    while not existing.exists():  # the nearest ancestor that exists: where it is created
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, so the directory cannot be made")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dsp-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path} is not writable ({e.strerror or e})") from None
    free = shutil.disk_usage(existing).free
    if need_bytes and free < need_bytes:
        raise ValueError(
            f"{flag} {path}: {_human(free)} free, one checkpoint needs about "
            f"{_human(need_bytes)}; free some space or choose another directory"
        )
