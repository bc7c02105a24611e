"""Comma-separated list flags shared by the sweep commands (``--frames 8,16,32``)."""

from __future__ import annotations

import argparse
from typing import List, Union


def ints(text: str) -> List[int]:
    """``"2,4"`` -> ``[2, 4]``."""
    return [int(v) for v in text.split(",") if v]


def names(text: str) -> List[str]:
    """``"dsp, ulysses"`` -> ``["dsp", "ulysses"]``."""
    return [v.strip() for v in text.split(",") if v.strip()]


def chunk_counts(text: str) -> List[Union[int, str]]:
    """``"1,4,auto"`` -> ``[1, 4, "auto"]`` (whole numbers >= 1, or ``auto``)."""
    out: List[Union[int, str]] = []
    for v in (v.strip() for v in text.split(",") if v.strip()):
        if v == "auto":
            out.append(v)
        elif v.isdigit() and int(v) >= 1:
            out.append(int(v))
        else:
            raise argparse.ArgumentTypeError(
                f"{v!r} is not a slice count: use whole numbers >= 1 or auto, e.g. 1,4,auto"
            )
    return out


def chunk_count(text: str) -> Union[int, str]:
    """``"4"`` -> ``4``, ``"auto"`` -> ``"auto"`` (one slice count)."""
    v = text.strip()
    if v != "auto" and not (v.isdigit() and int(v) >= 1):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a slice count: a whole number >= 1 or auto"
        )
    return v if v == "auto" else int(v)
