"""Tests of dsp.bench: link emulation and calibration; per-rank bodies for the worker processes
live here (importing the test module in a worker would re-run its namespace probe)."""

import os

import torch.distributed as dist


def where_am_i():
    """This worker's network namespace inode, its GLOO_SOCKET_IFNAME and its rank."""
    return (
        os.stat("/proc/self/ns/net").st_ino,
        os.environ.get("GLOO_SOCKET_IFNAME"),
        dist.get_rank(),
    )
