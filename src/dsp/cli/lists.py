"""Comma-separated list flags shared by the sweep commands (``--frames 8,16,32``)."""

from __future__ import annotations

from typing import List


def ints(text: str) -> List[int]:
    """``"2,4"`` -> ``[2, 4]``."""
    return [int(v) for v in text.split(",") if v]


def names(text: str) -> List[str]:
    """``"dsp, ulysses"`` -> ``["dsp", "ulysses"]``."""
    return [v.strip() for v in text.split(",") if v.strip()]
