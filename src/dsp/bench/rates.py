"""Link rates: parsing rates with units, and the named interconnects of H100 clusters.

``TARGETS`` and :func:`target_rate` also keep the first, peak-FLOP/s calibration
(``bandwidth x cpu_flops / peak_flops``) that reports quote for comparison; the calibration
in use matches a workload (:mod:`dsp.bench.target`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

__all__ = ["TARGETS", "Target", "parse_rate", "target_rate"]


@dataclass(frozen=True)
class Target:
    """A machine to emulate: per-GPU dense throughput and per-GPU bandwidth (one direction).

    Attributes:
        name: short key (``"nvlink"``, ``"ib"``).
        flops: dense throughput in FLOP/s (no sparsity).
        bandwidth: bytes/s one GPU can send while it also receives (one direction).
        description: what the numbers stand for and where they come from.
    """

    name: str
    flops: float
    bandwidth: float
    description: str


#: Named targets; see the module docstring for the sources of the numbers.
TARGETS = {
    "nvlink": Target(
        "nvlink",
        989e12,
        450e9,
        "H100 SXM5, 989 TFLOP/s dense BF16 (NVIDIA H100 datasheet, without sparsity); "
        "NVLink 4, 450 GB/s per direction per GPU (900 GB/s bidirectional), one node",
    ),
    "ib": Target(
        "ib",
        989e12,
        50e9,
        "H100 SXM5, 989 TFLOP/s dense BF16; NDR InfiniBand 400 Gb/s = 50 GB/s per GPU "
        "(ConnectX-7, one NIC per GPU as in DGX H100), across nodes",
    ),
}

_BYTE_UNITS = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_BYTE_UNITS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40})
_BIT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([A-Za-z/]*)\s*$")


def parse_rate(rate: Union[str, float, int]) -> float:
    """A rate in bytes/s from a number (bytes/s) or a string with units.

    Bytes (capital ``B``, decimal or binary prefixes, ``/s`` optional): ``"25MB/s"``,
    ``"1.5 GB/s"``, ``"512KiB/s"``, ``"800kB"``. Bits (``bit`` as in tc, any case, or
    ``b/s``): ``"200mbit"``, ``"400Mbit/s"``, ``"10Gb/s"``. ``"bps"`` is refused: tc reads it
    as bytes/s, most people as bits/s.

    Raises:
        ValueError: unparsable, unknown unit, or not positive.
    """
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        value = float(rate)
    else:
        m = _RATE_RE.match(str(rate))
        if not m:
            raise ValueError(f"dsp.bench: cannot parse rate {rate!r} (e.g. '25MB/s', '200mbit')")
        num, unit = float(m.group(1)), m.group(2)
        if unit.lower().endswith("bps"):
            raise ValueError(
                f"dsp.bench: ambiguous rate unit in {rate!r}: write bytes as 'MB/s' or bits as "
                "'mbit' / 'Mb/s'"
            )
        stem = unit[:-2] if unit.endswith("/s") else unit
        if stem.endswith("B") and stem[:-1] in _BYTE_UNITS:
            value = num * _BYTE_UNITS[stem[:-1]]
        elif stem.lower().endswith("bit") and stem[:-3].lower() in _BIT_UNITS:
            value = num * _BIT_UNITS[stem[:-3].lower()] / 8
        elif stem.endswith("b") and stem[:-1].lower() in _BIT_UNITS:
            value = num * _BIT_UNITS[stem[:-1].lower()] / 8
        elif unit == "":
            value = num
        else:
            raise ValueError(
                f"dsp.bench: unknown rate unit {unit!r} in {rate!r} (use B/s, kB/s, MB/s, "
                "GB/s, KiB/s, MiB/s, bit, kbit, mbit, gbit, Mb/s, Gb/s)"
            )
    if not value > 0:
        raise ValueError(f"dsp.bench: rate must be positive, got {rate!r}")
    return value


def _resolve(target: Union[str, Target, float, int]) -> Optional[Target]:
    """A :class:`Target` for a name or a Target; ``None`` for a raw rate."""
    if isinstance(target, Target):
        return target
    if isinstance(target, str) and target in TARGETS:
        return TARGETS[target]
    return None


def target_rate(target: Union[str, Target, float, int], cpu_flops: Optional[float]) -> float:
    """The emulated per-rank rate (bytes/s) for ``target`` on a CPU doing ``cpu_flops``.

    For a named target (or a :class:`Target`): ``bandwidth * cpu_flops / flops``, so that the
    compute:communication ratio on the CPU matches the target's. Anything else is read as a
    raw rate by :func:`parse_rate` (``"25MB/s"``, ``"200mbit"``, a number of bytes/s) and
    returned as it is; ``cpu_flops`` is then unused.
    """
    t = _resolve(target)
    if t is None:
        try:
            return parse_rate(target)
        except ValueError as e:
            raise ValueError(f"{e}; or name a target: {', '.join(sorted(TARGETS))}") from None
    if cpu_flops is None or not cpu_flops > 0:
        raise ValueError(f"dsp.bench: target {t.name!r} needs the CPU FLOP/s, got {cpu_flops}")
    return t.bandwidth * cpu_flops / t.flops
