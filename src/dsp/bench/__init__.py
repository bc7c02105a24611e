"""Benchmark support: an emulated, rate-limited interconnect (:mod:`dsp.bench.link`) and its
calibration to a target machine's compute:communication ratio (:mod:`dsp.bench.calibrate`)."""

from dsp.bench.calibrate import (
    TARGETS,
    Calibration,
    Target,
    calibrated_link,
    measure_alltoall_bandwidth,
    measure_cpu_flops,
    parse_rate,
    target_rate,
)
from dsp.bench.link import EmulatedLink, netns_available

__all__ = [
    "TARGETS",
    "Calibration",
    "EmulatedLink",
    "Target",
    "calibrated_link",
    "measure_alltoall_bandwidth",
    "measure_cpu_flops",
    "netns_available",
    "parse_rate",
    "target_rate",
]
